"""Built-in benchmarks: the analytic GMM, digits and the tiny SD-style teacher."""

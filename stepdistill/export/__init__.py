from .export import export_run

__all__ = ["export_run"]

"""Latent text-to-image distillation on the tiny_sd teacher: prompts, the embedding cache, CFG on text
embeddings, end-to-end DMD2, and the export loaded by stock StableDiffusionPipeline in a process that never
imports stepdistill."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import compose_cfg

TINY = ["benchmark=tiny_sd", "trainer.progress=false", "trainer.num_threads=2", "benchmark.num_real=16",
        "benchmark.teacher_steps=4", "eval.num_samples=16", "eval.batch_size=16", "logger.every=5"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One cache per module: the tiny_sd pipeline is built once, embeddings and teacher samples cached there."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("stepdistill-cache")
    mp.setenv("STEPDISTILL_CACHE", str(path))
    yield path
    mp.undo()


def test_prompt_files(tmp_path):
    from stepdistill.data.prompts import load_prompts
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text("id,prompt\n1,a cat\n2,\"a dog, running\"\n")
    assert load_prompts(tmp_path / "p.csv") == ["a cat", "a dog, running"]
    (tmp_path / "q.csv").write_text("id,caption\n1,a bird\n")
    assert load_prompts(tmp_path / "q.csv", "caption") == ["a bird"]
    with pytest.raises(ValueError, match="set benchmark.data.prompt_column"):
        load_prompts(tmp_path / "q.csv")
    with pytest.raises(ValueError, match="benchmark.data.prompt_column='text' is not a column"):
        load_prompts(tmp_path / "q.csv", "text")
    with pytest.raises(FileNotFoundError, match="benchmark.data.prompts="):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "bom.csv").write_text("\ufeffprompt,id\na fish,1\n", encoding="utf-8")   # as a spreadsheet saves it
    assert load_prompts(tmp_path / "bom.csv") == ["a fish"]
    (tmp_path / "bom.txt").write_text("\ufeffa fish\na cat\n", encoding="utf-8")   # the first prompt kept the mark
    assert load_prompts(tmp_path / "bom.txt") == ["a fish", "a cat"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n')   # read as lines before: the JSON text as prompts
    with pytest.raises(ValueError, match=r"p.jsonl: give a .txt \(one prompt per line\), .csv or .parquet file"):
        load_prompts(tmp_path / "p.jsonl")


def test_image_folder_captions_orientation_and_16_bit(tmp_path, caplog):
    """A metadata.csv with a `caption` column gave every image the empty prompt, silently; one without file_name a
    bare KeyError; a 16-bit grey PNG loaded as white (convert("RGB") clips at 255); a photo's EXIF orientation was
    ignored."""
    from PIL import Image

    from stepdistill.data.images import load_image, load_image_folder
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")   # mid-grey, 16 bit
    x = load_image(tmp_path / "grey16.png", 8)
    assert x.shape == (3, 8, 8) and x.abs().max() < 0.01
    tall = np.zeros((32, 16, 3), dtype=np.uint8)   # stored 16 wide, 32 high: white on its right half
    tall[:, 8:] = 255
    img = Image.fromarray(tall)
    exif = img.getexif()
    exif[0x0112] = 6   # Orientation: rotate 90° clockwise to display (32 wide, 16 high: white below)
    img.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    x = load_image(tmp_path / "photo.jpg", 16)   # the displayed image's centre: white on its lower half
    assert x[:, :4].mean() < -0.9 and x[:, -4:].mean() > 0.9
    (tmp_path / "metadata.csv").write_text("file_name,caption\ngrey16.png,a grey square\n")
    with pytest.raises(ValueError, match=r"has columns \['caption', 'file_name'\]: name them file_name and text"):
        load_image_folder(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,text\ngrey16.png,a grey square\n")
    with caplog.at_level("WARNING"):
        pairs = load_image_folder(tmp_path)
    assert [(p.name, c) for p, c in pairs] == [("grey16.png", "a grey square"), ("photo.jpg", "")]
    assert "1 of 2 images have no caption in metadata.csv" in caplog.text


def test_teacher_sample_keys_tell_prompt_lists_apart():
    """The key joined its parts with "|": ["a cat|a dog"] read the cached samples of ["a cat", "a dog"]."""
    from stepdistill.benchmarks.registry import build_benchmark
    from stepdistill.train.batches import regression_pairs_key
    bm = build_benchmark(compose_cfg(*TINY).benchmark)
    keys = []
    for prompts in (["a cat|a dog"], ["a cat", "a dog"], ["a cat", "a dog"], ["a cow", "a dog"]):
        bm.prompts = prompts
        keys.append((bm.teacher_samples_key(4), regression_pairs_key(bm, 4, 0)))
    assert keys[0][0] != keys[1][0] == keys[2][0] != keys[3][0]
    # the regression pairs' key follows the prompts too: it had the prompt file's path and the prompts' count only
    assert keys[1][1] == keys[2][1] != keys[3][1]


def test_parquet_prompts(tmp_path):
    from stepdistill.data.prompts import load_prompts
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": ["a fox", "a hen"]}), tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet") == ["a fox", "a hen"]


def test_parquet_prompts_without_pyarrow_say_what_to_install(tmp_path, monkeypatch):
    from stepdistill.data.prompts import load_prompts
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)   # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"needs pyarrow: pip install 'stepdistill\[parquet\]'"):
        load_prompts(tmp_path / "p.parquet")


def test_embedding_cache_encodes_each_prompt_once(tmp_path):
    from stepdistill.data.prompts import EmbeddingCache
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return torch.stack([torch.full((3, 2), float(len(p))) for p in prompts])

    first = EmbeddingCache("model-a", tmp_path)
    out = first.get(["ab", "abc", "ab"], encode)
    assert calls == [["ab", "abc"]] and out[:, 0, 0].tolist() == [2, 3, 2]
    second = EmbeddingCache("model-a", tmp_path)      # a second run: nothing re-encoded
    assert torch.equal(second.get(["abc", "ab"], encode), out[[1, 0]]) and second.encoded == 0
    other = EmbeddingCache("model-b", tmp_path)       # another model does not see model-a's embeddings
    other.get(["ab"], encode)
    assert other.encoded == 1
    # a miss writes a shard of its own prompts, not the whole table again: two runs writing at once keep both
    # (one file rewritten from each run's table lost the other's entries)
    a, b = EmbeddingCache("model-a", tmp_path), EmbeddingCache("model-a", tmp_path)
    a.get(["x"], encode), b.get(["yy"], encode)
    shards = sorted((tmp_path / "text_embeddings" / "model-a").glob("*.safetensors"))
    assert len(shards) == 3 and EmbeddingCache("model-a", tmp_path).index().keys() == {
        EmbeddingCache.key(p) for p in ("ab", "abc", "x", "yy")}
    # the single file of earlier versions is still read
    from stepdistill.data.cache import save_tensors
    save_tensors({EmbeddingCache.key("old"): torch.full((3, 2), 7.0)}, tmp_path / "text_embeddings" / "model-c.safetensors")
    old = EmbeddingCache("model-c", tmp_path)
    assert old.get(["old"], encode)[0, 0, 0] == 7.0 and old.encoded == 0


def test_embedding_table_reads_rows_on_demand(tmp_path, monkeypatch):
    """A prompt set's embeddings were encoded and stacked whole in memory (~236 KB per SD1.5 prompt). Now the
    missing ones are encoded `chunk` at a time, one shard each, and a batch reads only its own rows."""
    import pickle

    from stepdistill.data.prompts import EmbeddingCache, EmbeddingTable
    monkeypatch.setattr(EmbeddingCache, "chunk", 3)
    monkeypatch.setattr(EmbeddingTable, "max_open", 2)
    sizes = []

    def encode(prompts):
        sizes.append(len(prompts))
        return torch.stack([torch.full((3, 2), float(p)) for p in prompts])

    prompts = [str(i) for i in range(10)]
    table = EmbeddingCache("m", tmp_path).table(prompts, encode)
    assert sizes == [3, 3, 3, 1] and len(table) == 10 and not table._open   # nothing read yet
    assert len(list((tmp_path / "text_embeddings" / "m").glob("*.safetensors"))) == 4
    rows = table[torch.tensor([7, 0, 7, 9])]
    assert rows.shape == (4, 3, 2) and rows[:, 0, 0].tolist() == [7, 0, 7, 9]
    assert len(table._open) == 2   # the least recently used shard was closed
    again = pickle.loads(pickle.dumps(table))   # a copy opens its own shards
    assert torch.equal(again[[1, 2]], table[[1, 2]])
    assert EmbeddingCache("m", tmp_path).table(prompts[::-1], encode)[[0]][0, 0, 0] == 9 and sizes == [3, 3, 3, 1]


def test_caches_follow_the_tokenizer_and_the_negative_prompt(tmp_path, caplog):
    """The embedding cache was keyed on the text encoder alone (a changed tokenizer reused stale embeddings), and the
    teacher samples standing in for real data ignored the negative prompt, CFG's unconditional branch."""
    import logging
    import shutil

    from stepdistill.benchmarks.registry import build_benchmark
    teacher = tmp_path / "teacher"
    shutil.copytree(build_benchmark(compose_cfg(*TINY).benchmark).path, teacher)
    local = [*TINY, "benchmark=text_to_image", f"benchmark.teacher.path={teacher}"]
    with caplog.at_level(logging.WARNING, logger="stepdistill"):
        first = build_benchmark(compose_cfg(*local).benchmark)
    # a real teacher distilled on the eight built-in test prompts, without a word, made a student of eight prompts
    assert any("without benchmark.data.prompts" in r.getMessage() for r in caplog.records)
    config = teacher / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")   # the same tokenizer, but its files changed
    again = build_benchmark(compose_cfg(*local).benchmark)
    assert again.embedding_cache.folder != first.embedding_cache.folder
    negative = build_benchmark(compose_cfg(*local, "benchmark.negative_prompt='a blurry photo'").benchmark)
    assert negative.teacher_samples_key(16) != again.teacher_samples_key(16)


def test_model_key_changes_on_a_same_size_rewrite_within_one_second(tmp_path):
    """Cache keys stamp files by size and mtime: a rewrite that keeps the size, in the same second, must show."""
    import os
    from stepdistill.data.cache import model_key
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"a" * 64)
    os.utime(weights, ns=(1_700_000_000_100_000_000,) * 2)
    before = model_key(tmp_path / "unet")
    weights.write_bytes(b"b" * 64)
    os.utime(weights, ns=(1_700_000_000_600_000_000,) * 2)
    assert model_key(tmp_path / "unet") != before


def test_gaussian_frechet_distance_against_scipy():
    from scipy import linalg

    from stepdistill.eval.frechet import gaussian_frechet_distance
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) * 2 + 1
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert gaussian_frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert gaussian_frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_above_the_sample_count_against_scipy():
    """Latents of more dimensions than samples (SD at 512 px: 16384 per sample) go through the samples' cross
    product instead of D x D covariances: the same distance as scipy's sqrtm on those covariances."""
    from scipy import linalg

    from stepdistill.eval.frechet import gaussian_frechet_distance
    g = torch.Generator().manual_seed(1)
    a = torch.randn(30, 80, generator=g, dtype=torch.float64) @ torch.randn(80, 80, generator=g, dtype=torch.float64)
    b = torch.randn(45, 80, generator=g, dtype=torch.float64) * 2 + 0.5
    s1, s2 = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert gaussian_frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert gaussian_frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)
    assert gaussian_frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


def test_text_teacher_cfg_is_one_batched_call_on_the_negative_prompt():
    from stepdistill.train.setup import build_run
    run = build_run(compose_cfg(*TINY, "benchmark.negative_prompt=blurry"))
    bm, teacher = run.benchmark, run.roles["teacher"]
    assert bm.data_shape == (4, 8, 8) and len(bm.prompt_table) == 8
    x, t = torch.randn(3, *bm.data_shape), torch.tensor([100, 500, 900])
    cond = bm.sample_cond(3)
    null = bm.prompt_cond(["blurry"]).expand(3, -1, -1)
    calls = []
    hook = teacher.net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        guided = teacher.x0(x, t, cond, guidance=3.0)
        hook.remove()
        c, u = teacher.x0(x, t, cond), teacher.x0(x, t, null)
    assert calls == [6]       # cond and uncond in one batched call
    torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-4, atol=1e-4)
    assert (c - u).abs().max() > 1e-2   # the prompts matter: a wrong negative prompt or scale would show


def test_bad_text_to_image_inputs(tmp_path):
    from stepdistill.benchmarks.registry import build_benchmark
    cfg = compose_cfg("benchmark=text_to_image", f"benchmark.teacher.path={tmp_path / 'nope'}").benchmark
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_benchmark(cfg)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    cfg = compose_cfg("benchmark=text_to_image", f"benchmark.teacher.path={tmp_path / 'half'}").benchmark
    with pytest.raises(FileNotFoundError, match=r"lacks \['vae'"):
        build_benchmark(cfg)
    with pytest.raises(ValueError, match="benchmark.resolution=18"):
        build_benchmark(compose_cfg(*TINY, "benchmark.resolution=18").benchmark)
    with pytest.raises(ValueError, match="teacher.prediction_type='v_prediction' does not match"):
        build_benchmark(compose_cfg(*TINY, "benchmark.teacher.prediction_type=v_prediction").benchmark)
    # An SD3/Flux-style VAE (shifted latents): our latent maps and the SD/SDXL exports would ignore the shift.
    import json
    import shutil
    from stepdistill.benchmarks.tiny_sd_teacher import build_tiny_sd
    shifted = shutil.copytree(build_tiny_sd(tmp_path / "tiny"), tmp_path / "shifted")
    vae_config = json.loads((shifted / "vae" / "config.json").read_text())
    (shifted / "vae" / "config.json").write_text(json.dumps({**vae_config, "shift_factor": 0.1159}))
    with pytest.raises(ValueError, match=r"sets \{'shift_factor': 0.1159\}: benchmark=text_to_image supports"):
        build_benchmark(compose_cfg("benchmark=text_to_image", f"benchmark.teacher.path={shifted}").benchmark)
    # an LCM-style UNet's guidance embedding (time_cond_proj_dim), which the stock pipelines feed and we did not:
    # its export sampled 4.9 away from the student
    lcm = shutil.copytree(tmp_path / "tiny", tmp_path / "lcm")
    unet_config = json.loads((lcm / "unet" / "config.json").read_text())
    (lcm / "unet" / "config.json").write_text(json.dumps({**unet_config, "time_cond_proj_dim": 8}))
    with pytest.raises(ValueError, match="time_cond_proj_dim=8 .* give a teacher without it"):
        build_benchmark(compose_cfg("benchmark=text_to_image", f"benchmark.teacher.path={lcm}").benchmark)


def test_a_teacher_folder_saved_in_fp16_loads_in_float32(tmp_path, monkeypatch):
    """transformers loads a checkpoint's own dtype, diffusers float32: a teacher folder saved in fp16 (the usual local
    SD copy) gave fp16 text embeddings, which the fp32 UNet's attention refused at the first forward."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.benchmarks.registry import build_benchmark
    from stepdistill.benchmarks.tiny_sd_teacher import build_tiny_sd
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    half = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path / "tiny"), torch_dtype=torch.float16).save_pretrained(half)
    bm = build_benchmark(compose_cfg("benchmark=text_to_image", f"benchmark.teacher.path={half}", "benchmark.num_real=4",
                                     "benchmark.teacher_steps=2").benchmark)
    assert bm.text_encoder.dtype == torch.float32 and bm.eval_cond(2).dtype == torch.float32
    latents, _ = bm.real_samples   # the teacher's sampling: its UNet's attention took the fp16 embeddings before
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()


EXPORT_CHECK = r"""
import json, sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert type(pipe.scheduler).__name__ == "LCMScheduler"
prompts, out = json.loads(sys.argv[2]), {}
for name, kw in json.loads(sys.argv[3]).items():
    size = kw.pop("latent_size", 8)
    draws = []
    for output_type in ("latent", "np"):   # the same latents and the same generator state: the image decodes res
        g = torch.Generator().manual_seed(7)
        latents = torch.randn(len(prompts), 4, size, size, generator=g)
        draws.append(pipe(prompts, latents=latents, generator=g, guidance_scale=1.0, output_type=output_type,
                          **kw).images)
    res, img = draws
    out[name] = {"latents": res.flatten().tolist(), "image_shape": list(img.shape), "image": img.flatten().tolist()}
out["pipeline"] = type(pipe).__name__
out["stepdistill_imported"] = any(m.startswith("stepdistill") for m in sys.modules)
print(json.dumps(out))
"""


def run_stock_pipeline(export_dir, prompts, calls: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(export_dir), json.dumps(prompts), json.dumps(calls)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def give_the_student_weights_of_its_own(run):
    """An untrained (or barely trained) student is the teacher: an export of the teacher's UNet, or of the raw
    generator instead of the EMA copy, would match it too."""
    from stepdistill.networks.lora import diffusers_unet
    torch.manual_seed(11)
    with torch.no_grad():
        for p in diffusers_unet(run.student().denoiser).parameters():
            p.add_(0.02 * torch.randn_like(p))


def our_latents(run, prompts, timesteps=None, latent_size=8):
    from stepdistill.train.evaluation import student_sample
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(len(prompts), 4, latent_size, latent_size, generator=g)
    cond = run.benchmark.prompt_cond(prompts)
    return student_sample(run.student(), noise, cond, timesteps, g)


@pytest.mark.parametrize("name,pipeline", [("tiny_sd", "StableDiffusionPipeline"),
                                           ("tiny_sdxl", "StableDiffusionXLPipeline")])
def test_tiny_sd_dmd2_trains_and_exports_a_stock_stable_diffusion_pipeline(tmp_path, name, pipeline):
    """A few DMD2 steps end to end (GAN on teacher samples, CFG on the teacher), then the export: the stock
    pipeline samples the student in 1 and 4 steps with the student's own latents (SDXL: with its pooled text
    embedding and size/crop ids)."""
    from stepdistill.export import export_run
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    cfg = compose_cfg(*TINY, f"benchmark={name}", "trainer.max_steps=6", "eval.every=3", "trainer.checkpoint_every=6")
    trained = build_run(cfg)
    Trainer(trained, tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "student_latent_fd" in r]
    assert evals and all(np.isfinite(r["student_latent_fd"]) for r in evals)
    assert evals[-1]["student_latent_fd_num_samples"] == 16
    assert (tmp_path / "samples" / "step_0000006.png").is_file()
    run = trained
    prompts = ["a photo of a cat", "a zebra on the moon!"]
    # 2 generator updates at lr 2e-5, averaged by the EMA, leave the student ~1e-7 from the teacher
    from stepdistill.train.evaluation import student_sample
    give_the_student_weights_of_its_own(run)
    export_run(trained, tmp_path / "export")
    out = run_stock_pipeline(tmp_path / "export", prompts, {"one": {"num_inference_steps": 1},
                                                            "four": {"num_inference_steps": 4}})
    assert out["stepdistill_imported"] is False and out["pipeline"] == pipeline
    info = json.loads((tmp_path / "export" / "stepdistill_student.json").read_text())
    assert info["pipeline"] == pipeline and info["trained_timesteps"] == [999]
    for key, steps in (("one", 1), ("four", 4)):
        ts = run.student().default_timesteps(steps)
        ours = our_latents(run, prompts, ts)
        np.testing.assert_allclose(np.array(out[key]["latents"]), ours.flatten().numpy(), rtol=1e-4, atol=1e-4)
        g = torch.Generator().manual_seed(7)
        raw = student_sample(run.roles["generator"], torch.randn(2, 4, 8, 8, generator=g),
                             run.benchmark.prompt_cond(prompts), ts, g)
        assert (raw - ours).abs().max() > 1e-2   # the EMA copy is what was exported
        # the stock pipeline's images are stepdistill's decode of the same latents (benchmark.to_output)
        assert out[key]["image_shape"] == [2, 16, 16, 3]
        np.testing.assert_allclose(np.array(out[key]["image"]),
                                   run.benchmark.to_output(ours).permute(0, 2, 3, 1).flatten().numpy(),
                                   rtol=1e-4, atol=1e-4)


def test_custom_timesteps_round_trip(tmp_path):
    """A student trained at [999, 749, 499, 249] is sampled at exactly those by the stock pipeline."""
    from stepdistill.export import export_run
    from stepdistill.train.setup import build_run
    ts = [999, 749, 499, 249]
    run = build_run(compose_cfg(*TINY, "generator=four_step", f"generator.timesteps=[{','.join(map(str, ts))}]"))
    give_the_student_weights_of_its_own(run)
    export_run(run, tmp_path / "export")
    info = json.loads((tmp_path / "export" / "stepdistill_student.json").read_text())
    assert info["trained_timesteps"] == ts and f"timesteps={ts}" in info["sample"] and "height" not in info["sample"]
    out = run_stock_pipeline(tmp_path / "export", ["a red car on a road"], {"custom": {"timesteps": ts}})
    np.testing.assert_allclose(np.array(out["custom"]["latents"]),
                               our_latents(run, ["a red car on a road"]).flatten().numpy(), rtol=1e-4, atol=1e-4)


def test_a_student_trained_off_the_default_resolution_says_how_to_sample_it(tmp_path):
    """The stock pipeline makes the UNet's default size unless told: the export's sample line names the trained
    resolution, and the SDXL pipeline given it samples the student's own latents (its size ids included)."""
    from stepdistill.export import export_run
    from stepdistill.train.setup import build_run
    run = build_run(compose_cfg(*TINY, "benchmark=tiny_sdxl", "benchmark.resolution=32"))
    give_the_student_weights_of_its_own(run)
    export_run(run, tmp_path / "export")
    info = json.loads((tmp_path / "export" / "stepdistill_student.json").read_text())
    assert "height=32, width=32" in info["sample"]
    ts = info["trained_timesteps"]
    out = run_stock_pipeline(tmp_path / "export", ["a red car on a road"],
                             {"sized": {"timesteps": ts, "height": 32, "width": 32, "latent_size": 16}})
    np.testing.assert_allclose(np.array(out["sized"]["latents"]),
                               our_latents(run, ["a red car on a road"], latent_size=16).flatten().numpy(),
                               rtol=1e-4, atol=1e-4)


def test_a_diverged_students_latent_fd_is_nan_not_an_error():
    """nan latents made the covariance's eigh fail and ended the evaluation; now latent_fd is nan and counted."""
    from stepdistill.benchmarks.registry import build_benchmark
    bm = build_benchmark(compose_cfg(*TINY).benchmark)
    x = torch.randn(6, 4, 8, 8)
    x[2, 0, 0, 0] = float("nan")
    m = bm.evaluate(x)
    assert math.isnan(m["latent_fd"]) and m["num_nonfinite"] == 1 and m["latent_fd_num_samples"] == 6
    assert math.isfinite(bm.evaluate(x[3:])["latent_fd"])


def test_the_vae_decodes_where_the_teacher_runs():
    """The VAE is no role, so the run's move to a GPU left it on the CPU: an SD run's evaluation decoded its samples
    there. The meta device stands in for a GPU here (decoding on it gives no values to copy back)."""
    from stepdistill.benchmarks.registry import build_benchmark
    bm = build_benchmark(compose_cfg(*TINY).benchmark)
    x = torch.randn(2, 4, 8, 8)
    on_cpu = bm.to_output(x)
    assert on_cpu.device.type == "cpu" and on_cpu.shape[0] == 2
    bm.teacher.to("meta")
    with pytest.raises(NotImplementedError, match="meta"):
        bm.to_output(x)
    assert bm.vae.device.type == "meta"


@pytest.mark.parametrize("shared", [False, True])
def test_step_aware_critic_trains_on_a_text_to_image_teacher(tmp_path, shared):
    """The step-aware critic found no time embedding on a text-to-image critic (its UNet sits inside a wrapper, or
    behind an adapter view of the shared base) and refused every such run. Now it trains, and in shared-base mode
    the teacher's output on the shared UNet is untouched by the fake score's step embedding."""
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    extra = ["model.shared_base=true"] if shared else []
    run = build_run(compose_cfg(*TINY, "generator=four_step", "method.step_aware_critic=true", "trainer.max_steps=3",
                                "eval.every=0", "eval.final=false", "method.critic_steps=1", *extra))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    cond = run.benchmark.prompt_cond(["a cat", "a dog"])
    with torch.no_grad():
        before = run.roles["teacher"].x0(x, t, cond)
    Trainer(run, tmp_path).fit()
    emb = run.roles["critic_step_embedding"]
    assert any(p.abs().sum() > 0 for p in emb.parameters())   # the step embedding trained
    with torch.no_grad():
        torch.testing.assert_close(run.roles["teacher"].x0(x, t, cond), before, rtol=0, atol=0)


def test_teacher_cli_builds_tiny_sd_and_sample_cli_writes_prompts(tmp_path):
    from conftest import run_app
    run_app("stepdistill.cli.teacher", "benchmark=tiny_sd", f"out={tmp_path / 'tiny'}",
            f"hydra.run.dir={tmp_path / 'h'}")
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    run_app("stepdistill.cli.sample", "benchmark=tiny_sd", f"benchmark.teacher.path={tmp_path / 'tiny'}",
            "teacher_steps=2", "num_samples=3", f"out={tmp_path / 's.npz'}", f"hydra.run.dir={tmp_path / 'h2'}")
    data = np.load(tmp_path / "s.npz")
    assert data["samples"].shape == (3, 3, 16, 16) and data["samples"].dtype == np.float32
    assert 0 <= data["samples"].min() and data["samples"].max() <= 1
    assert list(data["prompts"]) == ["a photo of a cat", "a red car on a road", "a painting of a dog in the snow"]


LORA_CHECK = r"""
import json, sys, torch
from diffusers import DiffusionPipeline
teacher_dir, export_dir, prompt = sys.argv[1:4]
out = {}
def latents_of(pipe):
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    return pipe([prompt], latents=latents, generator=g, guidance_scale=1.0, num_inference_steps=1,
                output_type="latent").images.flatten().tolist()
out["export"] = latents_of(DiffusionPipeline.from_pretrained(export_dir))
pipe = DiffusionPipeline.from_pretrained(teacher_dir)
from diffusers import LCMScheduler
pipe.scheduler = LCMScheduler.from_pretrained(export_dir, subfolder="scheduler")
out["teacher"] = latents_of(pipe)
pipe.load_lora_weights(export_dir)
out["lora"] = latents_of(pipe)
pipe.fuse_lora()
out["fused"] = latents_of(pipe)
out["stepdistill_imported"] = any(m.startswith("stepdistill") for m in sys.modules)
print(json.dumps(out))
"""


@pytest.mark.parametrize("name,alpha,targets", [("tiny_sd", 4, None), ("tiny_sdxl", 4, None), ("tiny_sd", 8, None),
                                                ("tiny_sd", 4, "[to_q,proj_in]"),
                                                ("tiny_sdxl", 4, "[to_q,to_k,to_v,to_out.0,proj_in,conv1,time_emb_proj]")])
def test_lora_student_trains_only_its_adapter_and_exports_loadable_lora_weights(tmp_path, name, alpha, targets):
    """alpha 8 at rank 4: the saved weights alone loaded at alpha = rank, half the adapter's strength. Targets
    beyond the attention projections: the weights were saved half in diffusers' old key format, and
    load_lora_weights, judging by the first key, dropped the attention ones (latents off by up to 1.75)."""
    from stepdistill.export import export_run
    from stepdistill.networks.lora import diffusers_unet
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    extra = [f"generator.lora_targets={targets}"] if targets else []
    run = build_run(compose_cfg(*TINY, f"benchmark={name}", "generator.lora_rank=4", f"generator.lora_alpha={alpha}",
                                "trainer.max_steps=3", "eval.every=0", "eval.final=false", "method.critic_steps=1",
                                *extra))
    unet = diffusers_unet(run.roles["generator"].denoiser)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    Trainer(run, tmp_path).fit()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable           # the base weights never move, the adapter does
    assert all(not p.requires_grad for n, p in unet.named_parameters() if n not in trainable)

    # a few steps barely move a zero-initialised adapter: give the exported one weights that matter
    with torch.no_grad():
        for n, p in diffusers_unet(run.student().denoiser).named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    export_run(run, tmp_path / "export")
    info = json.loads((tmp_path / "export" / "stepdistill_student.json").read_text())
    assert info["lora"]["rank"] == 4 and (tmp_path / "export" / info["lora"]["weights"]).is_file()
    prompt = "a blue bird sitting on a branch"
    res = subprocess.run([sys.executable, "-c", LORA_CHECK, str(run.benchmark.path), str(tmp_path / "export"), prompt],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["stepdistill_imported"] is False
    ours = our_latents(run, [prompt]).flatten().numpy()
    for key in ("export", "lora", "fused"):
        np.testing.assert_allclose(np.array(out[key]), ours, rtol=1e-4, atol=1e-4, err_msg=key)
    assert np.abs(np.array(out["teacher"]) - ours).max() > 1e-2     # the adapter is what made the difference


def test_bad_lora_settings():
    from stepdistill.train.setup import build_run
    with pytest.raises(ValueError, match="lora_targets"):
        build_run(compose_cfg(*TINY, "generator.lora_rank=4", "generator.lora_targets=[nonexistent]"))
    with pytest.raises(ValueError, match="lora_rank=-1"):
        build_run(compose_cfg(*TINY, "generator.lora_rank=-1"))


def tiny_clip(path):
    """A random CLIPModel + CLIPProcessor (16×16 images, the tiny_sd tokenizer) saved locally."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPVisionConfig)

    from stepdistill.benchmarks.tiny_sd_teacher import build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer(max_length=16)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    model.save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    return path


def test_clip_score_from_a_local_model_matches_its_definition(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from stepdistill.eval.clip import clip_score
    path = tiny_clip(tmp_path / "clip")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 16, 16, generator=g)
    prompts = ["a photo of a cat", "a red car", "a dog", "a bowl of fruit", "an astronaut riding a horse"]
    got = clip_score(images, prompts, path, batch_size=2)
    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():   # independent: the model's own forward gives logit_scale · cos on its diagonal
        pix = proc(images=list((images * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
        ids = proc(text=prompts, return_tensors="pt", padding=True)
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pix)
        cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert got["clip_score_num_samples"] == 5
    assert got["clip_score"] == pytest.approx((100 * cos.clamp_min(0)).mean().item(), rel=1e-4, abs=1e-4)
    with pytest.raises(FileNotFoundError, match="eval.clip.model="):
        clip_score(images, prompts, tmp_path / "nothing")
    # a diverged student's nan pixels were cast to 0 and scored as black images; values past [0, 1] wrapped in
    # the uint8 cast (1.2 -> 50) instead of saturating
    bad = images.clone()
    bad[1, 0, 0, 0] = float("nan")
    nan = clip_score(bad, prompts, path)
    assert math.isnan(nan["clip_score"]) and nan["clip_score_num_nonfinite"] == 1
    assert clip_score(images * 1.5 - 0.25, prompts, path) == clip_score((images * 1.5 - 0.25).clamp(0, 1), prompts, path)


def test_evaluation_models_are_checked_before_training(tmp_path):
    """A missing eval.clip.model or eval.fid.inception_weights, or one the benchmark cannot use, ended the run at its
    first evaluation: after all the training, with no export."""
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    for setting, error, says in ((f"eval.clip.model={tmp_path / 'none'}", FileNotFoundError, "eval.clip.model="),
                                 (f"eval.fid.inception_weights={tmp_path / 'none.pth'}", FileNotFoundError,
                                  "InceptionV3 weights file not found")):
        with pytest.raises(error, match=says):
            Trainer(build_run(compose_cfg(*TINY, "trainer.max_steps=2", setting)), tmp_path / "run")
    with pytest.raises(ValueError, match="eval.clip.model needs a text-conditioned benchmark, not gmm"):
        Trainer(build_run(compose_cfg("benchmark=gmm", f"eval.clip.model={tiny_clip(tmp_path / 'clip')}")),
                tmp_path / "run2")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_clip_hook_in_training(tmp_path):
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    path = tiny_clip(tmp_path / "clip")
    run = build_run(compose_cfg(*TINY, "trainer.max_steps=2", "eval.every=0", f"eval.clip.model={path}"))
    Trainer(run, tmp_path / "run").fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "student_clip_score" in r][-1]
    assert 0 <= final["student_clip_score"] <= 100 and final["student_clip_score_num_samples"] == 16
    assert "teacher_clip_score" in final


def _train_rows(overrides, run_dir):
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    run = build_run(compose_cfg(*TINY, "trainer.max_steps=3", "eval.every=0", "eval.final=false", "logger.every=1",
                                "method.critic_steps=1", *overrides))
    trainer = Trainer(run, run_dir)
    trainer.fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run, trainer, [r for r in rows if "critic/loss" in r or "generator/loss" in r]


def test_shared_base_mode_memory_losses_and_export(tmp_path):
    """One frozen UNet for teacher, fake score, generator and EMA: the step-0 losses equal the full-copy mode's,
    parameter + optimizer memory is a fraction of it, training moves only the adapters (the teacher, which runs
    with adapters off, is unchanged), and the export is a stock pipeline + loadable LoRA weights."""
    from stepdistill.export import export_run
    from stepdistill.networks.shared_base import AdapterView, parameter_bytes
    full_run, full_tr, full_rows = _train_rows([], tmp_path / "full")
    shared_run, shared_tr, shared_rows = _train_rows(["model.shared_base=true"], tmp_path / "shared")
    for key in ("critic/loss", "critic/loss_fake_score", "critic/loss_gan_d"):
        assert shared_rows[0][key] == pytest.approx(full_rows[0][key], rel=1e-6), key

    teacher_bytes = sum(p.numel() * p.element_size() for p in full_run.roles["teacher"].parameters())
    full = parameter_bytes(full_run.roles, full_tr.optimizers.values())
    shared = parameter_bytes(shared_run.roles, shared_tr.optimizers.values())
    assert full["parameters"] >= 4 * teacher_bytes                 # teacher, fake score, generator, EMA
    assert shared["parameters"] < 1.3 * teacher_bytes              # one base + rank-16 adapters on a tiny UNet
    assert shared["total"] < full["total"] / 4

    view = next(m for m in shared_run.roles["generator"].modules() if isinstance(m, AdapterView))
    unet = view.shared.unet
    assert all(getattr(p, "frozen_base", False) for n, p in unet.named_parameters() if "lora_" not in n)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    # the teacher (adapters off) still equals a freshly loaded teacher
    from stepdistill.benchmarks.registry import build_benchmark
    fresh = build_benchmark(compose_cfg(*TINY).benchmark)
    x, cond = torch.randn(2, 4, 8, 8), fresh.sample_cond(2)
    with torch.no_grad():
        torch.testing.assert_close(shared_run.roles["teacher"].x0(x, torch.tensor([300, 800]), cond),
                                   fresh.teacher.x0(x, torch.tensor([300, 800]), cond))
    assert any(p.abs().sum() > 0 for n, p in unet.named_parameters() if "lora_B.generator." in n)  # moved off 0
    ema = view.shared.params("generator_ema")
    assert not all(torch.equal(a, b) for a, b in zip(ema, view.shared.params("generator")))   # an average

    # 3 steps leave the EMA adapter ~1e-2 of the generator's small move off 0: give it weights that matter, so an
    # export of the teacher, or of the generator's adapter instead of the EMA's, would not match
    with torch.no_grad():
        for p in (p for n, p in unet.named_parameters() if "lora_B.generator_ema." in n):
            p.normal_(0, 0.05)
    export_run(shared_run, tmp_path / "export")
    info = json.loads((tmp_path / "export" / "stepdistill_student.json").read_text())
    assert info["lora"]["rank"] == 16
    prompt = "a city street at night"
    res = subprocess.run([sys.executable, "-c", LORA_CHECK, str(shared_run.benchmark.path), str(tmp_path / "export"),
                          prompt], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    ours = our_latents(shared_run, [prompt]).flatten().numpy()
    for name in ("export", "lora", "fused"):
        np.testing.assert_allclose(np.array(out[name]), ours, rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.abs(np.array(out["teacher"]) - ours).max() > 1e-2     # the EMA adapter is what made the difference


def test_shared_base_needs_a_diffusers_teacher():
    from stepdistill.train.setup import build_run
    with pytest.raises(ValueError, match="model.shared_base needs a diffusers UNet teacher"):
        build_run(compose_cfg("benchmark=gmm", "model.shared_base=true"))


def test_gradient_checkpointing_switch_and_sd15_recipe(tmp_path):
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    run = build_run(compose_cfg(*TINY, "model.gradient_checkpointing=true", "trainer.max_steps=2", "eval.every=0",
                                "eval.final=false"))
    for name in ("fake_score", "generator"):
        unet = (run.roles[name].denoiser if name == "generator" else run.roles[name]).net.unet
        assert unet.is_gradient_checkpointing, name
    Trainer(run, tmp_path).fit()
    with pytest.raises(ValueError, match="model.gradient_checkpointing needs diffusers UNets"):
        build_run(compose_cfg("benchmark=gmm", "model.gradient_checkpointing=true"))
    # the shared UNet's recomputation in backward would run whichever adapter was switched on last
    with pytest.raises(ValueError, match="model.gradient_checkpointing with model.shared_base=true"):
        build_run(compose_cfg(*TINY, "model.shared_base=true", "model.gradient_checkpointing=true"))
    cfg = compose_cfg("experiment=sd15_dmd2", "benchmark.teacher.path=/models/sd15")
    assert (cfg.benchmark.name, cfg.benchmark.guidance, cfg.method.critic_steps) == ("text_to_image", 1.75, 10)
    assert cfg.optim.generator.lr == cfg.optim.critic.lr == 1e-5 and cfg.model.gradient_checkpointing
    assert list(cfg.optim.generator.betas) == list(cfg.optim.critic.betas) == [0.9, 0.999]   # DMD2's train_sd.py
    # ... whose fake score trains on the iteration's generator images; its warm-up lasts ~8 iterations on 64 GPUs
    assert cfg.method.reuse_generator_samples and cfg.optim.generator.warmup_steps == 0


def test_a_real_teacher_keeps_each_methods_critic_ratio():
    """benchmark/tiny_sd.yaml set method.critic_steps=2 for every method, and text_to_image and tiny_sdxl inherit
    it: a real teacher ran DMD2 at 2 instead of 5, rCM at 2 instead of 4, and DMD, SiD and SIM at 1:2 instead of
    1:1. The tiny pipelines' 2 is DMD2's alone now (benchmark_method presets)."""
    ratios = {b: {m: compose_cfg(f"benchmark={b}", f"method={m}").method.critic_steps
                  for m in ("dmd", "dmd2", "sid", "sim", "rcm")} for b in ("text_to_image", "tiny_sd", "tiny_sdxl")}
    assert ratios["text_to_image"] == {"dmd": 1, "dmd2": 5, "sid": 1, "sim": 1, "rcm": 4}
    assert ratios["tiny_sd"] == ratios["tiny_sdxl"] == {"dmd": 1, "dmd2": 2, "sid": 1, "sim": 1, "rcm": 4}


def test_sdxl_unconditional_branch_and_recipe():
    """SDXL's CFG branch, as its pipeline builds it for an empty negative prompt: zero states and pooled
    embedding, the same size/crop ids."""
    from stepdistill.benchmarks.registry import build_benchmark
    bm = build_benchmark(compose_cfg(*TINY, "benchmark=tiny_sdxl").benchmark)
    assert bm.sdxl and bm.force_zeros_for_empty_prompt
    null, cond = bm.teacher.null_embedding[0], bm.eval_cond(1)[0]
    p = bm.text_encoder_2.config.projection_dim
    assert null.shape == cond.shape and not null[:-1].any() and not null[-1, :p].any()
    assert null[-1, p:p + 6].tolist() == cond[-1, p:p + 6].tolist() == [16, 16, 0, 0, 16, 16]
    cfg = compose_cfg("experiment=sdxl_dmd2_4step", "benchmark.teacher.path=/models/sdxl")
    assert list(cfg.generator.timesteps) == [999, 749, 499, 249] and cfg.benchmark.guidance == 8.0
    assert list(cfg.optim.generator.betas) == [0.9, 0.999] and not cfg.generator.per_sample_step
    assert cfg.method.reuse_generator_samples


def test_real_image_folder_latents_are_cached_and_used(tmp_path):
    """benchmark.data.images: captions from metadata.csv, resize + centre crop, VAE latents cached (a second
    benchmark encodes nothing), then a DMD2 step trains on them (the GAN's real data)."""
    from PIL import Image

    from stepdistill.benchmarks.registry import build_benchmark
    from stepdistill.data.images import load_image
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    g = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, size in enumerate([(16, 16), (24, 16), (16, 32), (20, 20)]):
        name = f"sub/{i}.png" if i == 3 else f"{i}.png"
        Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a photo of a cat\nsub/3.png,a red car\n")
    overrides = (*TINY, f"benchmark.data.images={folder}")
    bm = build_benchmark(compose_cfg(*overrides).benchmark)
    latents, cond = bm.real_samples
    assert latents.shape == (4, 4, 8, 8) and cond.shape[0] == 4 and bm.images_encoded == 4
    torch.testing.assert_close(cond[0], bm.prompt_cond(["a photo of a cat"])[0])
    torch.testing.assert_close(cond[1], bm.prompt_cond([""])[0])        # no caption: the empty prompt
    with torch.no_grad():
        direct = bm.vae.encode(load_image(folder / "1.png", 16)[None]).latent_dist.mean * bm.vae.config.scaling_factor
    torch.testing.assert_close(latents[1:2], direct)
    assert load_image(folder / "2.png", 16).shape == (3, 16, 16)       # 16×32: resized, centre cropped
    again = build_benchmark(compose_cfg(*overrides).benchmark)
    torch.testing.assert_close(again.real_samples[0], latents)
    assert again.images_encoded == 0                                    # from the cache
    run = build_run(compose_cfg(*overrides, "trainer.max_steps=2", "eval.every=0", "eval.final=false"))
    Trainer(run, tmp_path / "run").fit()
    with pytest.raises(FileNotFoundError, match="benchmark.data.images="):
        build_benchmark(compose_cfg(*TINY, f"benchmark.data.images={tmp_path / 'none'}").benchmark).real_samples


def test_image_folder_captions_from_jsonl_and_an_empty_folder_is_an_error(tmp_path):
    """metadata.jsonl (🤗 imagefolder's other caption file) gives the captions, matched on the path under the
    folder; a folder without images is a one-line error naming the setting."""
    from PIL import Image

    from stepdistill.data.images import load_image_folder
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.webp"):
        Image.new("RGB", (4, 4)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    rows = [{"file_name": "a.jpg", "text": "a cat"}, {"file_name": "sub/c.webp", "text": "a car"},
            {"file_name": "b.png", "text": None}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [(p.relative_to(folder).as_posix(), c) for p, c in load_image_folder(folder)] == [
        ("a.jpg", "a cat"), ("b.png", ""), ("sub/c.webp", "a car")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"benchmark.data.images=.*holds no images"):
        load_image_folder(tmp_path / "empty")
    # imagefolder's split layout: each subfolder's own captions, file_name relative to them (all were dropped,
    # silently); a byte-order mark in the jsonl
    split = tmp_path / "split"
    for sub in ("train", "test"):
        (split / sub).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(split / sub / "a.png")
    (split / "train" / "metadata.csv").write_text("file_name,text\na.png,a cat\n")
    (split / "test" / "metadata.jsonl").write_text("\ufeff" + json.dumps({"file_name": "a.png", "text": "a dog"}) + "\n",
                                                   encoding="utf-8")
    assert [(p.relative_to(split).as_posix(), c) for p, c in load_image_folder(split)] == [
        ("test/a.png", "a dog"), ("train/a.png", "a cat")]


def test_zero_guidance_is_unconditional_and_bad_counts_are_errors():
    """`benchmark.guidance=0` (the unconditional branch alone) was read as unset and became 1.0; 0 teacher steps,
    real samples or pixels were replaced by the defaults the same way."""
    from stepdistill.benchmarks.registry import build_benchmark
    assert build_benchmark(compose_cfg(*TINY, "benchmark.guidance=0").benchmark).guidance == 0.0
    for override in ("benchmark.teacher_steps=0", "benchmark.num_real=0", "benchmark.resolution=0",
                     "benchmark.guidance=-1"):
        with pytest.raises(ValueError, match=f"{override}: need"):
            build_benchmark(compose_cfg(*TINY, override).benchmark)


def test_shared_base_adapters_on_embeddings_and_custom_gan_features():
    """peft names an Embedding's adapter weights `...lora_embedding_A.<adapter>` (no dot after the name): a role's
    adapter_params left them out (no optimizer, checkpoint or EMA copy). And a GAN feature module other than
    mid_block (`method.gan.feature_module=unet.down_blocks.1`) was not found through a role's view."""
    from diffusers import UNet2DConditionModel

    from stepdistill.networks.heads import find_feature_module
    from stepdistill.networks.shared_base import AdapterView, SharedBase
    from stepdistill.networks.text_unet import TextConditionedUNet
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), num_class_embeds=4,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    shared = SharedBase(unet)
    shared.add("fake_score", 4, targets=("to_q", "class_embedding"))
    adapter = {n for n, _ in unet.named_parameters() if "lora_" in n}
    assert {"class_embedding.lora_embedding_A.fake_score", "class_embedding.lora_embedding_B.fake_score"} <= adapter
    assert len(shared.params("fake_score")) == len(adapter)
    view = TextConditionedUNet(AdapterView(shared, "fake_score"))
    assert find_feature_module(view, "unet.down_blocks.1") is unet.down_blocks[1]
    assert find_feature_module(view) is unet.mid_block
    with pytest.raises(ValueError, match="cannot find the bottleneck module unet.down_blockz"):
        find_feature_module(view, "unet.down_blockz")


def test_a_lora_students_ema_shares_its_frozen_base_and_averages_the_adapter():
    """The EMA copied a LoRA student's frozen base (a second UNet in memory) and lerped it with itself at every
    generator update (98.8% of the elements on tiny_sd)."""
    from diffusers import UNet2DConditionModel

    from stepdistill.networks.lora import add_lora
    from stepdistill.train.ema import EMA, make_ema
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    add_lora(unet, 4, targets=("to_q",))
    ema_net = make_ema(unet)
    frozen = [(e, p) for e, p in zip(ema_net.parameters(), unet.parameters()) if getattr(p, "frozen_base", False)]
    adapter = [(e, p) for e, p in zip(ema_net.parameters(), unet.parameters()) if not getattr(p, "frozen_base", False)]
    assert frozen and adapter and all(e is p for e, p in frozen) and not any(e is p for e, p in adapter)
    ema = EMA(ema_net, unet)
    assert len(ema.params) == len(adapter)
    with torch.no_grad():
        for _, p in adapter:
            p.add_(1.0)
    ema.update(0.75)
    for e, p in adapter:
        torch.testing.assert_close(e, p - 0.75)

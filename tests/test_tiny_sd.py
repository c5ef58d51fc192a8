"""The tiny_sd teacher: built locally (no download) and loadable by stock diffusers in a process that never
imports stepdistill."""
import json
import os
import subprocess
import sys

from stepdistill.benchmarks.tiny_sd_teacher import build_tiny_sd, build_tokenizer

LOAD_AND_SAMPLE = r"""
import json, sys, torch
from diffusers import StableDiffusionPipeline
torch.set_num_threads(1)
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
out = {}
for steps in (1, 4):
    g = torch.Generator().manual_seed(0)
    img = pipe(["a photo of a cat", "a zebra on the moon!"], num_inference_steps=steps, guidance_scale=3.0,
               output_type="np", generator=g).images
    img = torch.from_numpy(img)
    out[steps] = [list(img.shape), bool(torch.isfinite(img).all()), float(img.std()), float((img[0] - img[1]).abs().max())]
out["stepdistill_imported"] = any(m.startswith("stepdistill") for m in sys.modules)
print(json.dumps(out))
"""


def test_tokenizer_covers_any_text_and_learns_frequent_words():
    tok = build_tokenizer(max_length=16)
    assert tok.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    text = "Zebra, 42 ümlaut!"
    pieces, vocab = tok.tokenize(text), tok.get_vocab()
    assert pieces and all(p in vocab for p in pieces)  # no unknowns (CLIP's unk is its end token)
    ids = tok(text, padding="max_length", max_length=16, truncation=True).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id
    assert ids[1:1 + len(pieces)] == tok.convert_tokens_to_ids(pieces) and ids[1 + len(pieces)] == tok.eos_token_id
    # CLIP lower-cases, and decodes every word end as a space
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_tiny_sd_folder_loads_and_samples_in_stock_diffusers(tmp_path):
    root = build_tiny_sd(tmp_path / "tiny_sd")
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= set(os.listdir(root))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, str(root)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["stepdistill_imported"] is False
    for steps in ("1", "4"):   # (the pipeline clamps to [0, 1]: a range check would hold for any output)
        shape, finite, spread, between_prompts = out[steps]
        assert shape == [2, 16, 16, 3] and finite
        assert spread > 1e-2 and between_prompts > 1e-3   # images, not a constant, and the prompt reaches them


def test_the_tiny_tokenizer_is_the_same_in_every_process():
    """The tokenizers library's BPE trainer breaks ties between equally frequent pairs in hash order: the
    vocabulary, and so the tiny_sd teacher, changed from one process to the next."""
    import subprocess
    import sys
    code = ("from stepdistill.benchmarks.tiny_sd_teacher import build_tokenizer as b; t = b(); "
            "print(len(t), t('an astronaut riding a horse, naive!').input_ids)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(outs) == 1
    from stepdistill.benchmarks.tiny_sd_teacher import build_tokenizer
    t = build_tokenizer()
    assert t.convert_ids_to_tokens(t("an astronaut riding a horse").input_ids)[1:-1] == [
        "an</w>", "astronaut</w>", "riding</w>", "a</w>", "horse</w>"]

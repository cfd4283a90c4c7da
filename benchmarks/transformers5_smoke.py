"""Core smoke check next to transformers 5 (uses no transformers API): python benchmarks/transformers5_smoke.py REPO."""
import os, shutil, sys, tempfile
import numpy as np
import transformers
import nucleusx_jax
from nucleusx_jax.convert import convert
from nucleusx_jax.train.config import load_config
from nucleusx_jax.train.loop import run

REPO = sys.argv[1]
fx = os.path.join(REPO, "tests", "fixtures", "nucleus_x_tiny")
c = np.load(os.path.join(fx, "cases.npz"))
tmp = tempfile.mkdtemp()
shutil.copytree(fx, os.path.join(tmp, "bin"), ignore=shutil.ignore_patterns("model.safetensors"))
print("transformers", transformers.__version__, "| nucleusx_jax from", os.path.dirname(nucleusx_jax.__file__))
for name, path in [("safetensors", fx), ("bin", os.path.join(tmp, "bin"))]:
    m = nucleusx_jax.from_pretrained(path)
    err = max(float(np.abs(m(c["input_ids"], forward_mode=f).logits - c["logits_" + f]).max()) for f in ("parallel", "recurrent"))
    err = max(err, float(np.abs(m(c["input_ids"], forward_mode="chunkwise", recurrent_chunk_size=int(c["chunk_size_div"])).logits - c["logits_chunkwise_div"]).max()))
    print(f"{name}: max |logits - reference| over the three forms = {err:.2e}")
m.save_pretrained(os.path.join(tmp, "ours"))
ours = nucleusx_jax.from_pretrained(os.path.join(tmp, "ours"))
print("ours: greedy generate == reference:", bool((ours.generate(c["gen_input_ids"], c["gen_attention_mask"], max_new_tokens=12) == c["gen_output_ids"]).all()))
convert(fx, os.path.join(tmp, "flax"), "flax", progress=False)
s = convert(os.path.join(tmp, "flax"), os.path.join(tmp, "torch"), "torch", progress=False)
print("converter round trip:", s)
summary = run(load_config(os.path.join(REPO, "configs", "tiny.yaml"), [f"train.run_dir={tmp}/run", "train.steps=3", "train.global_batch=2", "data.seq_len=32", "train.eval_every=0", "logging.progress=false", "logging.sample_tokens=4", "mesh.data=1"]))
print("tiny.yaml 3 steps: loss", summary["first_train_loss"], "->", summary["last_train_loss"], "| export", os.listdir(summary["hf_dir"]))
try:
    import nucleusx_jax.hf  # noqa: F401
except ImportError as e:
    print("nucleusx_jax.hf under transformers 5:", type(e).__name__, str(e).splitlines()[0][:120])

"""Reproducible notebook implementations of papers on shared encoders/decoders and fast decoding

Modules:

- `paper_repro.core.bench`: `paper-repro bench decoding` runs every decoding method of the collection on the same target (and draft) model, the same prompts and the same device, in one process, Spec-Bench style, and writes `results/<scale>/bench/decoding.*`.
- `paper_repro.core.data`: Nothing is downloaded at run time. Every dataset is built deterministically from files that ship with the machine (the Python standard library, Debian's gettext catalogs), committed compressed under `data/`, and checked against `data/MANIFEST.json` every time it is loaded.
- `paper_repro.core.decoding`: The shared core of every lossless decoding accelerator in this collection: a **draft** (a chain or a tree of guessed tokens), a **verifier** that checks the whole draft with one target forward pass, and a **generation loop** that keeps the KV cache consistent and records per-step statistics.
- `paper_repro.core.lm`: One small Llama-style LM (RoPE, RMSNorm, SwiGLU) that every decoding paper in the collection runs on, and an adapter that gives a Hugging Face causal LM the same protocol.
- `paper_repro.core.zoo`: A tokenizer and two LMs trained here, on the code corpus, in under ten minutes on two CPU cores: a **target** (about 5M parameters) and a **draft** (about 1M) for speculative decoding. Checkpoints are committed under `data/` with checksums, so a paper notebook loads a trained model in about a second.
- `paper_repro.decoding.copyspec`: Razvan-Gabriel Dumitru, Minglai Yang, Vikas Yadav, Mihai Surdeanu. *CopySpec: Accelerating LLMs with Speculative Copy-and-Paste Without Compromising Quality* (2025). arXiv:2502.08923. Official code: [RazvanDu/CopySpec](https://github.com/RazvanDu/CopySpec) (read for details; nothing here is copied from it)."""

__version__ = "0.1.0"

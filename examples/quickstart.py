"""Quickstart: the Python API on a project home after `loralens run` (default: the embedded SmolLM2 run).

    loralens run                          # once: the five stages on the embedded model (~13 min on 2 CPU cores)
    python examples/quickstart.py         # or: python examples/quickstart.py --home DIR

It opens the home, prints the most toxic heads, decodes the top one through its trained lens and the logit lens
on the corpus's most toxic prompt, samples continuations with and without that head (zero-ablated), then saves the
lenses to a portable folder and loads them back onto the model. Only the public API is used (`import loralens`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import loralens


def main(argv: list[str] | None = None) -> None:
    """Run the quickstart on the home given by --home (default $LORALENS_HOME or ./.loralens)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="project home after `loralens run` (default $LORALENS_HOME or ./.loralens)")
    parser.add_argument("--method", default="lens_contrast", help="head-score method to rank by")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens to sample per continuation")
    args = parser.parse_args(argv)

    # 1. The home: its warehouse, read-only, as pyarrow tables.
    home = loralens.open(args.home)
    top = home.head_scores(method=args.method).to_pylist()[:5]
    print(f"most toxic heads by {args.method}:")
    for row in top:
        print(f"  {row['rank']:>2}. L{row['layer']}H{row['head']}  score {row['score']:.4f}")
    head = f"L{top[0]['layer']}H{top[0]['head']}"  # heads are typed as "L21H3", "L21H3,L5H0", [(21, 3)], ...

    # 2. Decode that head on the corpus's most toxic prompt, under the trained lens and the logit lens.
    prompt = home.sql("SELECT text FROM prompts ORDER BY toxicity DESC NULLS LAST, prompt_idx LIMIT 1")["text"][0]
    prompt = prompt.as_py()
    lenses = home.lenses()  # the newest complete train version
    decoding = lenses.decode(prompt, heads=head, k=5, position="last")
    print(f"\nprompt: {json.dumps(prompt)}")
    for lens in ("trained", "logit"):
        tokens = ", ".join(f"{json.dumps(t)} {p:.3f}" for t, p in decoding.top(head, lens=lens))
        print(f"  {head} {lens:>7} lens: {tokens}")

    # 3. Sample with and without the head (zero ablation), from the same seed.
    lm = lenses.model  # the full model the lenses read (loaded on first decode)
    inputs = lm.tokenizer(prompt, return_tensors="pt")
    for label, heads in (("as is", []), (f"without {head}", head)):
        torch.manual_seed(0)
        with loralens.ablate(lm.model, heads, kind="zero"):
            out = lm.model.generate(**inputs, do_sample=True, top_p=0.9, top_k=0, max_new_tokens=args.new_tokens,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        text = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"\n{label}: {json.dumps(text)}")

    # 4. Take the lenses elsewhere: one flat folder (config.json + safetensors, a hub repository can hold it) that
    # loads onto the same model; a model with another unembedding is refused.
    with tempfile.TemporaryDirectory() as tmp:
        folder = lenses.save_pretrained(Path(tmp) / "lenses")
        again = loralens.Lenses.from_pretrained(folder, lm)
        same = again.decode(prompt, heads=head, k=5, position="last").top(head) == decoding.top(head)
        print(f"\nsaved to {folder.name}/ ({len(list(folder.iterdir()))} files) and loaded back: same top tokens: "
              f"{same}")


if __name__ == "__main__":
    main()

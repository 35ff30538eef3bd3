"""``magicdec-cut-draft``: a draft model cut from a target, its first N layers followed by its own
final norm and LM head, written as an HF model directory for ``magicdec-build --draft-model``.
No training: such an early exit predicts worse than the whole model; it shares the tokenizer and
the first layers' computation, which is what a standalone draft needs to be tried."""

from __future__ import annotations

import sys
from pathlib import Path

from magicdec_rt.checkpoint import embedded_model_path, load_source
from magicdec_rt.cli import OneLineErrors, ShowDefaults, run_cli
from magicdec_rt.errors import EngineError

from .build import write_weights


def cut_layers(source: str | Path | None, layers: int, out: str | Path) -> Path:
    """Write the first ``layers`` layers of ``source`` (default: the embedded model) to ``out``."""
    config, state, tokenizer, generation = load_source(embedded_model_path() if source is None else source)
    total = config["num_hidden_layers"]
    if not 1 <= layers < total:
        raise EngineError(f"layers={layers} is out of range: must be in [1, {total - 1}] (the model has {total})")
    keep = {k: v for k, v in state.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    config = dict(config, num_hidden_layers=layers)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:layers]
    out = Path(out)
    write_weights(out, config, keep, "float32")  # as the source was loaded (GGUF dequantized to float32)
    tokenizer.save_pretrained(out)
    if generation is not None:
        generation.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = OneLineErrors(prog="magicdec-cut-draft", description=__doc__, formatter_class=ShowDefaults)
    p.add_argument("--model", help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--layers", type=int, required=True, help="layers to keep, from the first")
    p.add_argument("--out", required=True, help="the draft model's directory")
    args = p.parse_args(argv)

    def run():
        print(f"wrote {cut_layers(args.model, args.layers, args.out)}", file=sys.stderr)
        return 0

    return run_cli(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())

"""An SGLang frontend program (sgl.function with gen / select over several turns) run against a
server started with `--speculative-algo specsa`.

    SGLANG_PLATFORM=specsa_cpu python -m sglang.launch_server --model-path M --device cpu \
        --dtype float32 --max-total-tokens 8192 --speculative-algo specsa --port 30000 &
    python examples/frontend_program.py http://127.0.0.1:30000

Greedy decoding (temperature 0), so every run gives the same answers; the tiny random test
models answer gibberish, real checkpoints answer the questions.
"""
from __future__ import annotations

import json
import sys

import sglang as sgl

QUESTIONS = ["What does speculative decoding draft?", "Which attention is sparse?"]
CHOICES = ["yes", "no", "maybe"]


@sgl.function
def multi_turn(s, questions: list[str], max_tokens: int = 12):
    s += "A conversation about fast sparse-attention inference.\n"
    for i, q in enumerate(questions):
        s += f"User: {q}\nAssistant:"
        s += sgl.gen(f"answer_{i}", max_tokens=max_tokens, temperature=0, ignore_eos=True)
        s += "\n"
    s += "User: Was that helpful?\nAssistant: "
    s += sgl.select("verdict", choices=CHOICES)


def run(url: str, questions: list[str] = QUESTIONS, max_tokens: int = 12) -> dict:
    """Run the program once; returns the generated fields and the full transcript."""
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    state = multi_turn.run(questions=questions, max_tokens=max_tokens)
    out = {f"answer_{i}": state[f"answer_{i}"] for i in range(len(questions))}
    out["verdict"] = state["verdict"]
    out["transcript"] = state.text()
    return out


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:30000"),
                     indent=1))

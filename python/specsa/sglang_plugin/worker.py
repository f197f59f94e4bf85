"""SpecSA's speculative worker: SGLang's EAGLE V2 pipeline with a separate draft model
(the STANDALONE worker: draft prefill, multi-step chain / top-k tree drafting,
`build_eagle_verify_input`, `run_eagle_verify` with greedy tree acceptance and KV commit, draft
extend). Target verification attention is the `specsa` NSA backend, which the SPECSA algorithm
forces on the target (algorithm.py), so this class only adapts the constructor to 0.5.17's
scheduler and checks that wiring.
"""
from __future__ import annotations

from sglang.srt.speculative.standalone_worker_v2 import StandaloneWorkerV2

from .algorithm import BACKEND


class SpecsaWorker(StandaloneWorkerV2):
    def __init__(self, server_args, gpu_id, nccl_port, target_worker, ps=None, **kwargs):
        # 0.5.17's scheduler passes ps= (scheduler.py:916-927) and keywords only.
        super().__init__(server_args=server_args, gpu_id=gpu_id, ps=ps, nccl_port=nccl_port,
                         target_worker=target_worker)

    def init_attention_backends(self):
        super().init_attention_backends()
        backend = type(self.target_worker.model_runner.attn_backend).__name__
        if backend not in ("SpecsaAttnBackend", "SpecsaTritonBackend"):
            raise ValueError(f"specsa worker: the target's attention backend is {backend}, "
                             f"expected the '{BACKEND}' backend (--attention-backend {BACKEND})")

"""Orchestrator (docs/DESIGN.md section 5): latency profiles, acceptance statistics and the throughput-aware
planner that picks the draft/verify strategy per prompt and per step inside a precision class.

Dependencies: specsa.config and specsa.draft_tree only (no model, runtime or kernel calls): pure Python on data.
"""
from .planner import (PRECISION_RULES, AdaptiveController, Candidates, Strategy,
                      allowed, ar_strategy, expected_accepted, plan_strategy, score_strategy)
from .profile import (PROFILES_DIR, DecodeEntry, DraftCost, ModelShape, Profile, ProfileError,
                      VerifyEntry, RUNTIME_SUBDIR, gpu_folder, load_profile, match_profile,
                      save_profile, shape_key)
from .acceptance_stats import AcceptanceStats

__all__ = ["PRECISION_RULES", "PROFILES_DIR", "AcceptanceStats", "AdaptiveController", "Candidates",
           "DecodeEntry", "DraftCost", "ModelShape", "Profile", "ProfileError",
           "Strategy", "VerifyEntry", "allowed", "ar_strategy", "expected_accepted",
           "RUNTIME_SUBDIR", "gpu_folder", "load_profile", "match_profile", "shape_key", "plan_strategy", "save_profile", "score_strategy"]

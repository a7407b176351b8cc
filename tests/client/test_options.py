"""A method's options as the client sends them: only those set to other than their default,
so that an llmuxd from before an option (which refuses options it does not know) still
takes every call that does not use it."""

from __future__ import annotations

from llmux.common.contract import CheckpointOptions, RestoreOptions, ResumeOptions


def test_defaults_are_not_sent() -> None:
    assert RestoreOptions().items() == []
    assert CheckpointOptions().items() == []
    assert ResumeOptions(gpu_map={}).items() == []


def test_what_is_set_is_sent_with_its_signature() -> None:
    assert RestoreOptions(replica=True).items() == [("replica", "b", True)]
    assert RestoreOptions(keep_images=False, gpu_map={0: 1}).items() == [
        ("keep_images", "b", False), ("gpu_map", "a{uu}", {0: 1})]
    assert CheckpointOptions(weights_bytes=5, gpus=[1]).items() == [
        ("weights_bytes", "t", 5), ("gpus", "au", [1])]

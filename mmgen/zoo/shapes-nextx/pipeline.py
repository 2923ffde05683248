"""Loads this directory with diffusers: DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)."""

from mmgen.pipelines.flow import NextXPipeline  # noqa: F401

"""Thin Prefect task wrappers around `dapt_core`: manifests in, manifests out, cached on content hashes."""

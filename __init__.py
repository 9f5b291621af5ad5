"""ComfyUI-EcoDiff: ComfyUI's entry point. Importing this package without ComfyUI must not fail."""
WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]

try:  # ComfyUI present: expose the V3 extension (nodes/ imports ComfyUI's API)
    import comfy_api.latest  # noqa: F401
except ImportError:  # plain Python (engine, CLI, tests without ComfyUI)
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ += ["comfy_entrypoint"]

"""Running the pack outside the editor: `host` boots ComfyUI in-process and loads the pack as
ComfyUI does, `api_client` talks to a running server, `workflow_format` converts between the
editor's and the API's workflow formats, `graph_check` checks a workflow against the host's node
classes, `model_files` knows which inputs name which model folder. Importing them needs only the
standard library; the pack's folder may be on sys.path until `host.boot()`, which takes it off
before ComfyUI is imported (the pack's `nodes` package would shadow ComfyUI's top-level `nodes`
module)."""

"""Where a prompt may write: inside ComfyUI's output folder only. A prompt can come from anyone
who reaches the server (POST /prompt), so no absolute path, no drive, no `..` and no link may
lead a node's file or folder elsewhere (the command-line trainer writes where its user says)."""
import os
import re

from .loaders import folder_paths


def inside_output(name, what, error, example):
    """The real path of the relative `name` inside the output folder; `error` (an exception
    class) names the input `what` and shows `example` when `name` would lead out."""
    root = os.path.realpath(folder_paths.get_output_directory())
    parts = name.replace("\\", "/").split("/")
    if (not name.strip() or os.path.isabs(name) or os.path.splitdrive(name)[0]
            or re.match(r"^[A-Za-z]:", name) or ".." in parts):
        raise error(
            f"{what} {name!r}: give a folder inside ComfyUI's output folder ({root}) as a "
            f"relative path without '..', e.g. {example} (absolute paths and '..' are refused: "
            "a prompt must not write outside the output folder)")
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise error(
            f"{what} {name!r} leads to {path}, outside ComfyUI's output folder ({root}), "
            "through a symbolic link; choose a folder inside the output folder")
    return path

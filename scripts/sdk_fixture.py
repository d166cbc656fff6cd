#!/usr/bin/env python3
"""Makes a workspace that builds the misbehaving test plugins against a changed copy of the
SDK, for the dylib fixtures that hosts must refuse (tests/it/bad_plugins.rs):

  skewed_sdk       the SDK claiming the next major version
  drifted_layout   the SDK with AbiFusionInput::text_bytes a u64

The change is made to a copy, so the SDK itself holds no test-only code. Files are written
only where their content differs, so that cargo rebuilds the copy only when the SDK changed.

Usage: scripts/sdk_fixture.py VARIANT OUT_DIR   (run from the repository root)
"""

import pathlib
import re
import shutil
import sys

# Each variant: (file, text, replacement); every text must occur exactly once.
EDITS = {
    "skewed_sdk": [("sdk/Cargo.toml", '\nversion = "0.2.0"\n', '\nversion = "1.0.0"\n')],
    "drifted_layout": [
        ("sdk/src/abi.rs", "pub text_bytes: u32,", "pub text_bytes: u64,"),
        ("sdk/src/abi.rs", "text_bytes: i.text_bytes,", "text_bytes: i.text_bytes as u32,"),
    ],
}
COPIED = ["sdk", "tests/plugins/misbehaving"]


def write_if_changed(path: pathlib.Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def workspace_manifest(root_manifest: str) -> str:
    """The root manifest's workspace and profile tables, with the copied crates as members
    (profile overrides of packages the copy does not hold are left out)."""
    sections = re.split(r"(?m)^(?=\[)", root_manifest)
    kept = []
    for section in sections:
        header = section.split("\n", 1)[0].strip()
        if header == "[workspace]":
            members = ", ".join(f'"{m}"' for m in COPIED)
            kept.append(f"[workspace]\nmembers = [{members}]\nresolver = \"2\"\n\n")
        elif header.startswith("[workspace."):
            kept.append(section)
        elif header.startswith("[profile.") and (".package." not in header or '"*"' in header):
            kept.append(section)
    return "".join(kept)


def main() -> None:
    variant, out = sys.argv[1], pathlib.Path(sys.argv[2])
    if variant not in EDITS:
        sys.exit(f"error: unknown fixture {variant!r}; one of {', '.join(EDITS)}")
    files = {}
    for folder in COPIED:
        for src in pathlib.Path(folder).rglob("*"):
            if src.is_file():
                files[str(src)] = src.read_bytes()
    for name, text, replacement in EDITS[variant]:
        content = files[name].decode()
        if content.count(text) != 1:
            sys.exit(f"error: {name} no longer holds `{text}` exactly once; update the {variant} edit in {__file__}")
        files[name] = content.replace(text, replacement).encode()
    files["Cargo.toml"] = workspace_manifest(pathlib.Path("Cargo.toml").read_text()).encode()
    for name, data in files.items():
        write_if_changed(out / name, data)
    # The root's lock file pins the same dependency versions; cargo trims it to the copy.
    if not (out / "Cargo.lock").exists():
        shutil.copy("Cargo.lock", out / "Cargo.lock")


if __name__ == "__main__":
    main()

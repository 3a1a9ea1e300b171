"""Running a notebook in tests: a kernel that is this interpreter, and the text of its outputs."""

import json
import sys
from pathlib import Path


def kernel_manager(tmp_path: Path):
    """A `python3` kernel that is this interpreter (the venv), whatever kernelspecs the machine has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    # The connection file goes in tmp_path too: by default it is left in the temporary folder.
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm,
                         connection_file=str(tmp_path / "kernel-connection.json"))


def output_texts(nb) -> list[str]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if "text" in o:
                out.append(o["text"])
            for mime in ("text/markdown", "text/plain", "text/html"):
                if mime in o.get("data", {}):
                    out.append(o["data"][mime])
    return out

"""Put on PYTHONPATH, makes torch and torchvision unimportable in this process and in every process it
starts with that environment (the CLI, its Ray raylet and workers), as in an install without the [train]
extra. Each process that loads it appends its pid to $KMNIST_NO_TORCH_PIDS, so a test can tell that Ray's
workers ran under it too."""

import os
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (tests/no_torch blocks it)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
if os.environ.get("KMNIST_NO_TORCH_PIDS"):
    with open(os.environ["KMNIST_NO_TORCH_PIDS"], "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {' '.join(sys.argv[:2])[:200]}\n")

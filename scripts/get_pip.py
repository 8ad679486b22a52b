"""Install pip into the running interpreter from pip's own wheel on PyPI (for virtual environments created
with --without-pip on systems that lack ensurepip, e.g. Debian without python3-venv). Standard library only."""

import json
import os
import subprocess
import sys
import tempfile
import urllib.request

INDEX = os.environ.get("CLOUDMASK_PYPI_JSON", "https://pypi.org/pypi/pip/json")


def main() -> int:
    try:
        with urllib.request.urlopen(INDEX, timeout=60) as response:
            release = json.load(response)
        wheel = next(u for u in release["urls"] if u["packagetype"] == "bdist_wheel")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, wheel["filename"])
            urllib.request.urlretrieve(wheel["url"], path)
            # a pip wheel can run itself: python pip.whl/pip install pip.whl
            return subprocess.call([sys.executable, os.path.join(path, "pip"), "install", "--quiet", path])
    except (OSError, ValueError, KeyError, StopIteration) as e:
        print(f"error: could not fetch pip from {INDEX}: {e} (install python3-venv or python3-pip instead)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

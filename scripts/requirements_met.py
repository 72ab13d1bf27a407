"""Exit 0 if the installed packages satisfy every line of the requirement files given (and of the files
they include with -r), else print the first that is not met and exit 1. scripts/setup.sh installs then."""
import importlib.metadata
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement


def lines(path: Path):
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            yield from lines(path.parent / line[2:].strip())
        elif line:
            yield line


for file in sys.argv[1:]:
    for line in lines(Path(file)):
        requirement = Requirement(line)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            print(f"{file}: {line} is not met ({version or 'not installed'}): installing", file=sys.stderr)
            sys.exit(1)

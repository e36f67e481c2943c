import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The helpers in tests/ (daemon.py, ...) are imported by plain name.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def public_tmp():
    """A directory an unprivileged uid can reach: pytest's tmp_path sits
    under a 0700 directory of root's."""
    d = Path(tempfile.mkdtemp(prefix="pufflet-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)

"""`import tdro` and `import tdro.models` must not import torchvision (it costs seconds)."""
import subprocess
import sys


def test_tdro_and_models_import_without_torchvision():
    code = (
        "import sys, tdro, tdro.models\n"
        "from tdro.models import create_encoder\n"
        "create_encoder('cnn', 4)\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

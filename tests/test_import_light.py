"""What start-up must not pay for: `import tdro` and `tdro.models` without torchvision, and a training run
without the compiler (torch._dynamo, pulled in by torch.optim's wrappers), scikit-learn, SciPy, pandas or
matplotlib, none of which it needs (bench/startup.py measures what each costs)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from tdro.config import Config
from tdro.data.digits import load_digit_images
from tdro.training.optim import create_optimizer

NOT_FOR_TRAINING = ("torchvision", "torch._dynamo", "sklearn", "scipy", "pandas", "matplotlib")


def run_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_tdro_and_models_import_without_torchvision():
    run_python(
        "import sys, tdro, tdro.models\n"
        "from tdro.models import create_encoder\n"
        "create_encoder('cnn', 4)\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
    )


def test_a_digits_training_run_imports_no_compiler_sklearn_scipy_pandas_or_matplotlib(tmp_path):
    run_python(
        "import sys\n"
        "from tdro.config import Config\n"
        "from tdro.training.trainer import resume, train\n"
        f"config = Config(output_dir={str(tmp_path)!r}, run_name='run', epochs=1, progress=False)\n"
        "result = train(config)\n"
        "resume(result.run_dir)\n"  # a checkpoint loaded back into the optimiser (load_state_dict)
        f"loaded = [name for name in {NOT_FOR_TRAINING!r} if name in sys.modules]\n"
        "assert not loaded, f'imported by training: {loaded}'\n"
    )


@pytest.mark.parametrize("name, torch_class, options", [
    ("adam", torch.optim.Adam, {}),
    ("adamw", torch.optim.AdamW, {}),
    ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
])
def test_optimisers_without_the_compiler_wrappers_step_exactly_as_torch(name, torch_class, options):
    """Same class, same (fused) kernels: the parameters after 5 steps and a state round trip are bit-identical."""
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    theirs.load_state_dict(ours.state_dict())
    config = Config(optimizer=name, lr=1e-2, weight_decay=1e-3, **options)
    optimizer = create_optimizer(config, {"backbone": [], "new": list(ours.parameters())})
    reference = torch_class(theirs.parameters(), lr=1e-2, weight_decay=1e-3, fused=True, **options)
    x = torch.randn(16, 6)
    for step in range(5):
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            opt.step()
        if step == 2:
            optimizer.load_state_dict(optimizer.state_dict())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert torch.is_grad_enabled()


def test_digit_images_are_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    images, labels = load_digit_images()
    digits = load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)

"""The sparse path's state is one object (`SAE.sparse_path`), and architectures use the module one way."""

import ast
import copy
import pickle

import torch
from helpers.paths import ROOT

import fastsae
from fastsae.sparse_path import SparsePath, default_sparse_width_limit

ARCH_DIR = ROOT / "fastsae" / "architectures"


def test_architectures_call_no_private_member_of_the_module():
    """Calls go one way: the module calls its architecture, which reads public attributes only."""
    found = []
    for path in sorted(ARCH_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("sae", "folded", "master", "forward_sae") and node.attr.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert len(list(ARCH_DIR.glob("*.py"))) >= 6, "the scan found no architecture file"
    assert found == []


def test_batchtopk_bound_lives_in_the_sparse_path_and_survives_its_state_dict():
    torch.manual_seed(0)
    sae = fastsae.SAE(d_in=24, d_sae=96, architecture="batchtopk", k=4)
    sae.sparse_width_limit = 96
    sae.train()
    sae.training_forward(torch.randn(37, 24))
    bound = sae.sparse_path.batchtopk_bound
    assert bound >= 16 and sae._batchtopk_bound == bound
    state = sae.sparse_path.state_dict()
    sae.sparse_path.batchtopk_bound = 0
    sae.sparse_path.hint = False
    sae.sparse_path.load_state_dict(state)
    assert sae.sparse_path.batchtopk_bound == bound and sae._sparse_hint is True


def test_copies_and_pickles_get_their_own_sparse_path_and_old_pickles_load():
    sae = fastsae.SAE(d_in=8, d_sae=32, architecture="relu")
    sae.sparse_width_limit = 5
    twin = copy.deepcopy(sae)
    twin.sparse_path.hint = False
    assert sae.sparse_path.hint is True and twin.sparse_width_limit == 5
    state = sae.__getstate__().copy()
    # A module pickled before SparsePath held its numbers as instance attributes.
    del state["sparse_path"]
    state.update(sparse_width_limit=7, _sparse_hint=False, _dense_passes_to_skip=3, _overflow_backoff=4)
    old = fastsae.SAE.__new__(fastsae.SAE)
    old.__setstate__(state)
    assert old.sparse_path == SparsePath(width_limit=7, hint=False, dense_passes_to_skip=3, overflow_backoff=4)
    again = pickle.loads(pickle.dumps(old))
    assert again.sparse_width_limit == 7 and again._overflow_backoff == 4


def test_overflow_backoff_doubles_up_to_64_and_a_fit_resets_it():
    path = SparsePath()
    skips = []
    for _ in range(8):
        path.overflowed()
        skips.append(path.dense_passes_to_skip)
    assert skips == [1, 2, 4, 8, 16, 32, 64, 64] and not path.hint
    path.fitted()
    assert path.overflow_backoff == 1
    path.dense_passes_to_skip = 1
    assert not path.wants_a_look() and path.wants_a_look()
    path.saw_widest(widest=10, limit=12)  # 4 * 10 > 3 * 12: still too dense
    assert not path.hint and path.dense_passes_to_skip == 7
    path.saw_widest(widest=9, limit=12)
    assert path.hint


def test_default_width_limit():
    assert default_sparse_width_limit(16384, "cpu") == 2048
    assert default_sparse_width_limit(4, "cpu") == 1
    assert default_sparse_width_limit(16384, "meta") == 0
    assert SparsePath(width_limit=0).limit(16384, "cpu") == 0

"""DataType and its mappings, the small enums, and CacheDesc (spec §4.2-4.7, §9, §27 #1)."""
import subprocess
import sys

import pytest
import torch

from llm_datadist_torch import data_type as data_type_module
from llm_datadist_torch.cache_desc import CacheDesc
from llm_datadist_torch.data_type import DataType, from_torch_dtype, itemsize, to_torch_dtype
from llm_datadist_torch.enums import (LLMRole, Memtype, Placement, PushType, RegisterMemStatus,
                                      register_mem_status_from_int, role_to_engine_string)
from llm_datadist_torch.status import LLMStatusCode
from helpers import raises_llm

PARAM = LLMStatusCode.LLM_PARAM_INVALID


# -- DataType ------------------------------------------------------------------------------------

EXPECTED_DTYPES = [  # (member, value, itemsize, torch dtype), in upstream declaration order
    ("DT_FLOAT", 0, 4, torch.float32),
    ("DT_FLOAT16", 1, 2, torch.float16),
    ("DT_BF16", 27, 2, torch.bfloat16),
    ("DT_INT8", 2, 1, torch.int8),
    ("DT_INT16", 6, 2, torch.int16),
    ("DT_UINT16", 7, 2, torch.uint16),
    ("DT_UINT8", 4, 1, torch.uint8),
    ("DT_INT32", 3, 4, torch.int32),
    ("DT_INT64", 9, 8, torch.int64),
    ("DT_UINT32", 8, 4, torch.uint32),
    ("DT_UINT64", 10, 8, torch.uint64),
    ("DT_BOOL", 12, 1, torch.bool),
    ("DT_DOUBLE", 11, 8, torch.float64),
    ("DT_STRING", 13, 16, None),
]


def test_data_type_members_values_and_order():
    assert [(m.name, m.value) for m in DataType] == [(n, v) for n, v, _, _ in EXPECTED_DTYPES]
    assert not isinstance(DataType.DT_FLOAT, int)  # plain Enum, not IntEnum
    assert str(DataType.DT_FLOAT16) == "DataType.DT_FLOAT16"


@pytest.mark.parametrize("name,value,size,torch_dtype", EXPECTED_DTYPES)
def test_itemsize_and_torch_mapping(name, value, size, torch_dtype):
    dt = DataType[name]
    assert itemsize(dt) == size
    if torch_dtype is None:
        with raises_llm():
            to_torch_dtype(dt)
        return
    assert to_torch_dtype(dt) is torch_dtype
    assert from_torch_dtype(torch_dtype) is dt
    assert torch.empty(0, dtype=torch_dtype).element_size() == size


def test_torch_mapping_errors():
    with pytest.raises(TypeError):
        to_torch_dtype(1)
    with pytest.raises(TypeError):
        to_torch_dtype(None)
    with pytest.raises(TypeError):
        itemsize("DT_FLOAT")
    with pytest.raises(TypeError):
        from_torch_dtype("float32")
    with pytest.raises(TypeError):
        from_torch_dtype(DataType.DT_FLOAT)
    with pytest.raises(ValueError):
        from_torch_dtype(torch.complex64)


def test_numpy_tables():
    import numpy as np

    to_np = data_type_module.dtype_to_np_dtype
    assert len(to_np) == 14
    assert to_np[DataType.DT_BF16] is np.float16  # upstream's lossy quirk
    assert to_np[DataType.DT_STRING] is np.bytes_
    assert data_type_module.valid_np_dtypes == list(to_np.values())
    from_np = data_type_module.np_dtype_to_dtype
    assert len(from_np) == 13
    assert from_np[np.dtype(np.float16)] is DataType.DT_FLOAT16
    assert DataType.DT_BF16 not in from_np.values()
    assert from_np[np.dtype(np.uint64)] is DataType.DT_UINT64
    # Cached after the first access.
    assert data_type_module.dtype_to_np_dtype is to_np


def test_numpy_tables_are_lazy():
    code = ("import llm_datadist_torch.data_type as d\n"
            "assert 'dtype_to_np_dtype' not in vars(d)\n"
            "t = d.np_dtype_to_dtype\n"
            "assert 'dtype_to_np_dtype' in vars(d) and vars(d)['np_dtype_to_dtype'] is t\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_repo_root())


def _repo_root():
    import pathlib
    return str(pathlib.Path(__file__).resolve().parents[2])


def test_data_type_module_unknown_attribute():
    with pytest.raises(AttributeError, match="has no attribute"):
        data_type_module.NoSuchTable  # noqa: B018


# -- enums -----------------------------------------------------------------------------------------

def test_llm_role():
    assert [(r.name, int(r)) for r in LLMRole] == [("PROMPT", 1), ("DECODER", 2), ("MIX", 3)]
    assert str(LLMRole.PROMPT) == "LLMRole.PROMPT"
    assert LLMRole.DECODER == 2
    assert [role_to_engine_string(r) for r in LLMRole] == ["Prompt", "Decoder", "Mix"]
    assert role_to_engine_string(3) == "Mix"


def test_placement():
    assert Placement.HOST == 0 and Placement.DEVICE == 1
    assert str(Placement.DEVICE) == "Placement.DEVICE"
    assert str(Placement.HOST) == "Placement.HOST"


def test_register_mem_status_and_memtype():
    assert [(s.name, s.value) for s in RegisterMemStatus] == [
        ("OK", 0), ("PREPARING", 1), ("FAILED", 2)]
    assert not isinstance(RegisterMemStatus.OK, int)
    assert [register_mem_status_from_int(v) for v in (0, 1, 2, 3, -1)] == [
        RegisterMemStatus.OK, RegisterMemStatus.PREPARING, RegisterMemStatus.FAILED,
        RegisterMemStatus.FAILED, RegisterMemStatus.FAILED]
    assert [(m.name, m.value) for m in Memtype] == [("MEM_TYPE_DEVICE", 0), ("MEM_TYPE_HOST", 1)]
    assert str(Memtype.MEM_TYPE_HOST) == "Memtype.MEM_TYPE_HOST"
    assert [p.value for p in PushType] == [0, 1, 2]


# -- CacheDesc ---------------------------------------------------------------------------------

FP16 = DataType.DT_FLOAT16


def test_cache_desc_defaults_and_properties():
    shape = [4, 8, 16]
    desc = CacheDesc(2, shape, FP16)
    assert desc.num_tensors == 2
    assert desc.shape is shape  # stored by reference
    assert desc.data_type is FP16
    assert desc.placement is Placement.DEVICE
    assert desc.batch_dim == 0
    assert desc.batch_size == 4
    assert desc.seq_len_dim_index == -1
    assert desc.kv_tensor_format is None
    assert desc.size == 4 * 8 * 16 * 2
    assert desc._is_blocks is False


def test_cache_desc_all_arguments():
    desc = CacheDesc(3, (5, 6, 7), DataType.DT_INT32, Placement.HOST, 1, 2, "BSND")
    assert desc.shape == (5, 6, 7)
    assert desc.placement is Placement.HOST
    assert desc.batch_dim == 1
    assert desc.batch_size == 6  # follows batch_dim_index
    assert desc.seq_len_dim_index == 2
    assert desc.kv_tensor_format == "BSND"
    assert desc.size == 5 * 6 * 7 * 4


def test_cache_desc_repr_exact():
    desc = CacheDesc(2, [2, 4], DataType.DT_BF16, Placement.HOST, 0, 1, "ND")
    assert repr(desc) == ("CacheDesc(num_tensors=2, shape=[2, 4], data_type=DataType.DT_BF16, "
                          "placement=Placement.HOST, batch_dim_index=0, seq_len_dim_index=1,"
                          "kv_tensor_format=ND)")


def test_conformance_1_negative_num_tensors():
    with pytest.raises(ValueError):
        CacheDesc(-1, [2, 4], DataType.DT_INT8, Placement.DEVICE)


@pytest.mark.parametrize("num_tensors", ["1", 1.0, None])
def test_step1_num_tensors_type(num_tensors):
    with pytest.raises(TypeError):
        CacheDesc(num_tensors, [2, 4], FP16)


def test_step1_num_tensors_range():
    with pytest.raises(ValueError):
        CacheDesc(2**32, [2, 4], FP16)
    assert CacheDesc(0, [2, 4], FP16).num_tensors == 0  # not checked at construction
    assert CacheDesc(2**32 - 1, [2], FP16).num_tensors == 2**32 - 1


@pytest.mark.parametrize("shape", ["24", {2: 4}, 3, [2, "4"], (2, 4.0), [None]])
def test_step2_shape_type(shape):
    with pytest.raises(TypeError):
        CacheDesc(1, shape, FP16)


def test_step2_shape_none_fails_at_len():
    with pytest.raises(TypeError):
        CacheDesc(1, None, FP16)


def test_step3_data_type():
    with pytest.raises(TypeError):
        CacheDesc(1, [2], 1)
    with pytest.raises(TypeError):
        CacheDesc(1, [2], torch.float16)
    desc = CacheDesc(1, [2], None)  # None passes and is stored
    assert desc.data_type is None
    with pytest.raises(AttributeError):
        desc.size  # noqa: B018
    with pytest.raises(AttributeError):
        desc._dims_valid()


def test_step4_placement():
    with pytest.raises(TypeError):
        CacheDesc(1, [2], FP16, 1)
    with pytest.raises(TypeError):
        CacheDesc(1, [2], FP16, 0)
    assert CacheDesc(1, [2], FP16, None).placement is None


def test_step5_batch_dim_index():
    with pytest.raises(TypeError):
        CacheDesc(1, [2], FP16, Placement.DEVICE, "0")
    with pytest.raises(TypeError):  # passes step 5, fails the step-8 comparison
        CacheDesc(1, [2], FP16, Placement.DEVICE, None)


def test_step6_seq_len_dim_index():
    with pytest.raises(TypeError):
        CacheDesc(1, [2, 3], FP16, Placement.DEVICE, 0, "1")
    with pytest.raises(TypeError):
        CacheDesc(1, [2, 3], FP16, Placement.DEVICE, 0, None)
    with pytest.raises(ValueError):
        CacheDesc(1, [2, 3], FP16, Placement.DEVICE, 0, 2**31)


def test_step7_kv_tensor_format():
    with pytest.raises(TypeError):
        CacheDesc(1, [2], FP16, Placement.DEVICE, 0, -1, 1)


@pytest.mark.parametrize("shape,batch_dim", [([2, 3], 2), ([2, 3], -1), ([], 0)])
def test_step8_batch_dim_range(shape, batch_dim):
    with raises_llm():
        CacheDesc(1, shape, FP16, Placement.DEVICE, batch_dim)


@pytest.mark.parametrize("seq_len_dim", [2, -2, 5])
def test_step9_seq_len_dim_range(seq_len_dim):
    with raises_llm():
        CacheDesc(1, [2, 3], FP16, Placement.DEVICE, 0, seq_len_dim)


def test_step10_shape_elements_int64():
    with pytest.raises(ValueError):
        CacheDesc(1, [2, 2**63], FP16)
    with pytest.raises(ValueError):
        CacheDesc(1, [-(2**63) - 1], FP16)
    # Non-positive dims are only rejected later (size / allocate).
    desc = CacheDesc(1, [0, -1], FP16)
    assert desc.batch_size == 0


def test_validation_order():
    with pytest.raises(ValueError):  # step 1 before step 2
        CacheDesc(-1, "bad", FP16)
    with pytest.raises(TypeError):  # step 2 before step 3
        CacheDesc(1, "bad", "bad")
    with pytest.raises(TypeError):  # step 7 before step 8
        CacheDesc(1, [2], FP16, Placement.DEVICE, 5, -1, 1)
    with raises_llm():  # step 8 before step 10
        CacheDesc(1, [2**63], FP16, Placement.DEVICE, 1)
    with raises_llm():  # step 9 before step 10
        CacheDesc(1, [2**63], FP16, Placement.DEVICE, 0, 3)


def test_size_of_string_and_large_tensors():
    assert CacheDesc(1, [2, 3], DataType.DT_STRING).size == 96
    assert CacheDesc(1, [2**63 - 1], DataType.DT_INT8).size == 2**63 - 1


@pytest.mark.parametrize("shape,dt", [
    ([2, 0], FP16), ([-1, 4], FP16), ([2**62, 2], FP16), ([2**63 - 1], FP16),
])
def test_size_failures_are_param_invalid(shape, dt):
    desc = CacheDesc(1, shape, dt)
    with raises_llm():
        desc.size  # noqa: B018


def test_size_is_cached_and_update_dim_invalidates():
    shape = [2, 4]
    desc = CacheDesc(1, shape, DataType.DT_FLOAT)
    assert desc.size == 32
    shape[1] = 100  # mutating behind its back: the cached size is kept (upstream)
    assert desc.size == 32
    desc.update_dim(1, 8)
    assert shape == [2, 8]
    assert desc.size == 64
    desc.update_dim(0, 10)
    assert desc.batch_size == 2  # not refreshed
    assert desc.size == 320
    desc.update_dim(0, 0)  # no validation in update_dim ...
    with raises_llm():  # ... but size fails
        desc.size  # noqa: B018


def test_update_dim_needs_mutable_shape():
    desc = CacheDesc(1, (2, 4), FP16)
    with pytest.raises(TypeError):
        desc.update_dim(0, 3)


def test_dims_valid():
    assert CacheDesc(1, [2, 4], FP16)._dims_valid()
    assert CacheDesc(1, [1] * 31, FP16)._dims_valid()
    assert not CacheDesc(1, [1] * 32, FP16)._dims_valid()
    assert not CacheDesc(1, [2, 0], FP16)._dims_valid()
    assert not CacheDesc(1, [2, -1], FP16)._dims_valid()
    assert not CacheDesc(1, [2**62, 2], FP16)._dims_valid()
    shape = [3]
    desc = CacheDesc(1, shape, FP16)
    shape.clear()
    assert not desc._dims_valid()


def test_cache_desc_identity_semantics():
    a = CacheDesc(1, [2], FP16)
    b = CacheDesc(1, [2], FP16)
    assert a != b
    assert len({a, b}) == 2


def test_cache_desc_properties_are_read_only():
    desc = CacheDesc(1, [2], FP16)
    for name in ("num_tensors", "shape", "data_type", "placement", "batch_dim", "batch_size",
                 "seq_len_dim_index", "kv_tensor_format", "size"):
        with pytest.raises(AttributeError):
            setattr(desc, name, 1)

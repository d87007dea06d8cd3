"""Export open_clip's two towers as separate ONNX graphs with the contract's names and batch axis."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from clip_triton.contract import VISION, ModelContract
from clip_triton.contract import tower as tower_spec
from clip_triton.errors import ClipTritonError

PROTOBUF_LIMIT = 2 * 1024**3
DEFAULT_EXTERNAL_THRESHOLD = int(1.8 * 1024**3)  # leave headroom under protobuf's 2 GB


def tower_module(model, tower: str):
    """A module whose forward is one tower plus L2 normalisation, output in float32."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    class Tower(torch.nn.Module):
        """One tower of an open_clip model as a module: its encoder, then L2 normalisation in float32."""

        def __init__(self, clip, encode_name: str):
            super().__init__()
            self.clip, self.encode_name = clip, encode_name

        def forward(self, x):
            return F.normalize(getattr(self.clip, self.encode_name)(x).float(), dim=-1)

    return Tower(model, "encode_image" if tower_spec(tower) is VISION else "encode_text").eval()


def tower_parameter_bytes(model, tower: str) -> int:
    prefix = "visual." if tower_spec(tower) is VISION else None
    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        in_vision = name.startswith("visual.")
        if (prefix and in_vision) or (not prefix and not in_vision):
            total += tensor.numel() * tensor.element_size()
    return total


def to_half(model) -> None:
    """fp16 weights with LayerNorm kept in float32, as open_clip's own fp16 models do.

    Linear/conv/attention weights and projections go to fp16 (``convert_weights_to_lp``); LayerNorm
    modules become ``LayerNormFp32`` (input cast to float32, float32 affine), so the graph computes
    every normalisation in float32. Softmax is handled on the graph (:func:`softmax_in_fp32`).
    """
    import torch  # noqa: PLC0415
    from open_clip.model import convert_weights_to_lp  # noqa: PLC0415
    from open_clip.transformer import LayerNorm, LayerNormFp32  # noqa: PLC0415

    convert_weights_to_lp(model, torch.float16)
    for module in model.modules():
        if type(module) is LayerNorm:
            module.__class__ = LayerNormFp32


def example_input(contract: ModelContract, tower: str, batch: int = 2):
    import torch  # noqa: PLC0415

    spec, _ = contract.encoder_io(tower)
    if tower_spec(tower) is VISION:
        dtype = torch.float16 if spec.dtype == "float16" else torch.float32
        return torch.zeros((batch, *spec.shape), dtype=dtype)
    ids = torch.zeros((batch, *spec.shape), dtype=torch.int32)
    ids[:, 0], ids[:, 1] = contract.tokenizer.sot_token_id, contract.tokenizer.eot_token_id
    return ids


def export_tower(
    model,
    contract: ModelContract,
    tower: str,
    out_dir: Path,
    *,
    opset: int = 18,
    external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
) -> dict:
    """Write the tower's graph (file name from the contract); return facts for the manifest."""
    import torch  # noqa: PLC0415

    if not 17 <= opset <= 20:
        raise ClipTritonError(f"opset {opset} is outside 17-20", "LayerNormalization needs opset >= 17")
    spec_in, spec_out = contract.encoder_io(tower)
    path = Path(out_dir) / tower_spec(tower).onnx_file
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    size = tower_parameter_bytes(model, tower)
    external = size > external_threshold
    batch = torch.export.Dim("batch", min=contract.batch.min, max=max(contract.batch.max, 2))
    with torch.no_grad():
        program = torch.onnx.export(
            tower_module(model, tower),
            (example_input(contract, tower),),
            dynamo=True,
            input_names=[spec_in.name],
            output_names=[spec_out.name],
            dynamic_shapes=({0: batch},),  # by position: the graph's input is named by input_names
            opset_version=opset,
            verbose=False,
        )
        program.save(os.fspath(path), external_data=external)
    del program
    gc.collect()
    if contract.precision == "fp16":
        softmax_in_fp32(path)
    check_graph(path, contract, tower)
    data = path.with_name(path.name + ".data")
    return {
        "file": path.name,
        "external_data": data.name if data.exists() else None,
        "graph_bytes": path.stat().st_size,
        "data_bytes": data.stat().st_size if data.exists() else 0,
        "parameter_bytes": size,
    }


def softmax_in_fp32(path: Path) -> int:
    """Run every Softmax of an fp16 graph in float32 (Cast in, Softmax, Cast back). Returns the count."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    model = onnx.load(os.fspath(path), load_external_data=False)
    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != "Softmax":
            nodes.append(node)
            continue
        count += 1
        src, dst = node.input[0], node.output[0]
        up, down = f"{node.name or 'softmax'}_{count}_fp32_in", f"{node.name or 'softmax'}_{count}_fp32_out"
        nodes.append(helper.make_node("Cast", [src], [up], name=up + "_cast", to=TensorProto.FLOAT))
        softmax = helper.make_node("Softmax", [up], [down], name=node.name or f"softmax_{count}")
        softmax.attribute.extend(node.attribute)
        nodes.append(softmax)
        nodes.append(helper.make_node("Cast", [down], [dst], name=down + "_cast", to=TensorProto.FLOAT16))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # Shapes recorded for the old Softmax outputs stay valid (same tensor names, same dtype).
    onnx.save(model, os.fspath(path))  # initializers keep their external-data references
    return count


def float32_islands(path: Path) -> dict[str, list[str]]:
    """For each LayerNormalization/Softmax node, the element type of its data input."""
    import onnx  # noqa: PLC0415

    model = onnx.load(os.fspath(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.input})
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    found: dict[str, list[str]] = {"LayerNormalization": [], "Softmax": []}
    for node in inferred.graph.node:
        if node.op_type in found:
            found[node.op_type].append(onnx.TensorProto.DataType.Name(types.get(node.input[0], 0)))
    return found


def check_graph(path: Path, contract: ModelContract, tower: str) -> None:
    """``onnx.checker`` by path (so external data is handled) and the contract's names/dtypes."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto  # noqa: PLC0415

    try:
        onnx.checker.check_model(os.fspath(path))
    except (onnx.checker.ValidationError, OSError, ValueError) as exc:
        raise ClipTritonError(f"{path} failed onnx.checker: {exc}", "re-run the export") from None
    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    spec_in, spec_out = contract.encoder_io(tower)
    dtype = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32}
    for value, spec in ((graph.input, spec_in), (graph.output, spec_out)):
        if len(value) != 1 or value[0].name != spec.name:
            raise ClipTritonError(f"{path}: expected one tensor named {spec.name}, found {[v.name for v in value]}")
        tensor_type = value[0].type.tensor_type
        if tensor_type.elem_type != dtype[spec.dtype]:
            raise ClipTritonError(
                f"{path}: {spec.name} has element type {tensor_type.elem_type}, expected {spec.dtype}"
            )
        dims = tensor_type.shape.dim
        if dims[0].dim_value != 0 or not dims[0].dim_param:
            raise ClipTritonError(f"{path}: {spec.name} has no dynamic batch axis")
        if tuple(d.dim_value for d in dims[1:]) != spec.shape:
            raise ClipTritonError(f"{path}: {spec.name} shape {[d.dim_value for d in dims[1:]]} != {list(spec.shape)}")

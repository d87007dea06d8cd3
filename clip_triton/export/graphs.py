"""Export open_clip's two towers as separate ONNX graphs with the contract's names and batch axis."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from clip_triton.contract import BUCKETABLE_POOLING, REFUSED_PIXEL_FLOOR, VISION, ModelContract
from clip_triton.contract import tower as tower_spec
from clip_triton.errors import ClipTritonError

PROTOBUF_LIMIT = 2 * 1024**3
DEFAULT_EXTERNAL_THRESHOLD = int(1.8 * 1024**3)  # leave headroom under protobuf's 2 GB


def tower_module(model, tower: str):
    """open_clip's own encoder of one tower plus L2 normalisation, output in float32: the reference
    (``encode_text`` takes exactly context_length tokens)."""
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


def text_tower(model):
    """The module holding the text tower's layers: CustomTextCLIP (SigLIP, EVA, PE-Core, MobileCLIP)
    keeps open_clip's TextTransformer in ``.text``; CLIP keeps them on the model itself."""
    return getattr(model, "text", model)


def is_hf_text(model) -> bool:
    """Whether the text tower is open_clip's HFTextEncoder (a Hugging Face transformer)."""
    return type(getattr(model, "text", None)).__name__ == "HFTextEncoder"


def text_context(model, contract: ModelContract | None = None) -> int:
    """The number of tokens open_clip's ``encode_text`` is given: the positional table's length, or for
    a Hugging Face tower the tokenizer's context length."""
    table = getattr(text_tower(model), "positional_embedding", None)
    if table is not None:
        return int(table.shape[0])
    if contract is None:
        raise ClipTritonError("a Hugging Face text tower's context length comes from the contract")
    return contract.context_length


def refusable(encoder, contract: ModelContract, tower: str):
    """``encoder`` whose output row is all NaN where the input row carries the contract's refusal mark
    (clip_triton/contract.py ``REFUSED_PIXEL``: an image row whose first value is at least
    ``REFUSED_PIXEL_FLOOR``; a token row whose first id is the padding id). One ``Where`` on the output,
    so every other row is the encoder's own value, bit for bit; the fronts write the mark into a refused
    item's row, and every runtime (TensorRT, ONNX Runtime, OpenVINO, the python encoders) then answers
    NaN for it without an extra input or model hop."""
    import torch  # noqa: PLC0415

    vision = tower_spec(tower) is VISION
    pad = contract.tokenizer.pad_token_id
    if not vision and pad < 0:
        raise ClipTritonError(
            f"{contract.model}'s padding id is unknown ({pad}) at export", "export reads it from the tokenizer's files"
        )

    class Refusable(torch.nn.Module):
        """The encoder, then NaN rows for the inputs its front refused."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            embedding = self.inner(x)
            valid = x[:, 0, 0, 0] < REFUSED_PIXEL_FLOOR if vision else x[:, 0] != pad
            return torch.where(valid.unsqueeze(1), embedding, torch.full_like(embedding, float("nan")))

    return Refusable(encoder).eval()


def export_module(model, contract: ModelContract, tower: str):
    """The module exported for a tower, refused rows NaN (:func:`refusable`). A static text graph and
    the towers that do not pool one token (timm towers, average or attention pooling) are open_clip's
    own encoders (:func:`tower_module`). An open_clip ViT pooling its class token runs its last block
    for that token only (:func:`pooled_transformer`). With text buckets the text encoder runs on the
    first L tokens, L given by the input, with the positional embedding and causal mask cut to L, and
    its last block for each row's EOT token only: open_clip's ``encode_text`` step by step otherwise,
    so a text whose EOT lies inside the cut embeds exactly as its whole context (checked per bucket
    against ``encode_text`` by verify). The manifest records which graphs pool (``pooled_last_block``)."""
    return refusable(_encoder_module(model, contract, tower), contract, tower)


def poolable_block(transformer) -> bool:
    """Whether open_clip's ``Transformer`` can run its last block for the pooled token alone
    (:func:`pooled_transformer`): batch first, and the last block open_clip's plain
    ``ResidualAttentionBlock`` (self-attention, then the MLP, each token on its own after attention)."""
    from open_clip.transformer import ResidualAttentionBlock  # noqa: PLC0415

    blocks = getattr(transformer, "resblocks", None)
    if not blocks or not getattr(transformer, "batch_first", False):
        return False
    return type(blocks[-1]) is ResidualAttentionBlock and not hasattr(blocks[-1], "ln_1_kv")


def pooled_transformer(transformer, x, rows, attn_mask=None):
    """open_clip's ``Transformer`` on ``x`` (batch, tokens, width) with its last block computed for one
    token per row: ``rows`` (an int, or one position per row), the token the tower pools. Returns
    (batch, width): the full forward's output at that token, the same arithmetic for it.

    Every block but the last runs as open_clip's. In the last, keys and values still come from every
    token (the normalised input), but the query, the attention's output projection and the MLP run
    for the pooled token only: the other tokens' outputs are thrown away by the pooling, and after
    the attention each token's residual path is its own. That is 10 of the block's 12 weight products
    per token (q, the output projection, the MLP's 8), ~7% of a 12-layer tower's arithmetic
    (ViT-B/32: 8.73 GFLOP per image -> 8.15), ~2% of ViT-bigG's 48-layer vision tower."""
    import torch  # noqa: PLC0415

    blocks = transformer.resblocks
    for block in blocks[:-1]:
        x = block(x, attn_mask=attn_mask)
    last = blocks[-1]
    normed = last.ln_1(x)  # ln_1 is per token: the query's rows are rows of this
    mask = None
    if isinstance(rows, int):
        query, residual = normed[:, rows : rows + 1], x[:, rows : rows + 1]
        if attn_mask is not None:
            mask = attn_mask[rows : rows + 1]
    else:
        batch = torch.arange(x.shape[0], device=x.device)
        query, residual = normed[batch, rows].unsqueeze(1), x[batch, rows].unsqueeze(1)
        if attn_mask is not None:  # each row's own mask row, per head: (batch * heads, 1, tokens)
            heads = last.attn.num_heads
            mask = attn_mask[rows].unsqueeze(1).unsqueeze(1).expand(-1, heads, -1, -1).flatten(0, 1)
    y = residual + last.ls_1(last.attention(q_x=query, k_x=normed, v_x=normed, attn_mask=mask))
    y = y + last.ls_2(last.mlp(last.ln_2(y)))
    return y[:, 0]


def poolable_vision(visual) -> bool:
    """Whether a vision tower pools one token after its transformer (open_clip's ``VisionTransformer``
    with the class token, ``pool_type`` 'tok', no attention pooling), so :func:`pooled_transformer`
    applies. timm towers, average pooling and attention pooling keep open_clip's own forward."""
    from open_clip.transformer import VisionTransformer  # noqa: PLC0415

    return (
        type(visual) is VisionTransformer
        and getattr(visual, "attn_pool", None) is None
        and getattr(visual, "pool_type", None) == "tok"
        and not getattr(visual, "output_tokens", False)
        and poolable_block(visual.transformer)
    )


def pooled_vision_module(model):
    """open_clip's ``encode_image`` (then L2 normalisation in float32) with the last block for the
    class token only (:func:`pooled_transformer`); ``ln_post`` is per token, so pooling before or
    after it (``final_ln_after_pool``) is the same."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    class PooledVision(torch.nn.Module):
        """The vision tower, its last block for the class token."""

        pooled = True

        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, pixels):
            visual = self.visual
            pooled = visual.ln_post(pooled_transformer(visual.transformer, visual._embeds(pixels), 0))
            if visual.proj is not None:
                pooled = pooled @ visual.proj
            return F.normalize(pooled.float(), dim=-1)

    return PooledVision(model.visual).eval()


def _encoder_module(model, contract: ModelContract, tower: str):
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from open_clip.transformer import text_global_pool  # noqa: PLC0415

    if tower_spec(tower) is VISION:
        return pooled_vision_module(model) if poolable_vision(model.visual) else tower_module(model, tower)
    if not contract.tokenizer.dynamic or is_hf_text(model):
        # A Hugging Face text tower takes any length as it is: its mask comes from the ids.
        return tower_module(model, tower)
    text = text_tower(model)
    if getattr(text, "attn_mask", None) is None or contract.tokenizer.pool_type not in BUCKETABLE_POOLING:
        raise ClipTritonError(
            f"{contract.model}'s text tower is not causal with EOT pooling: it cannot be cut to buckets",
            "export with --text-buckets none",
        )

    class CutText(torch.nn.Module):
        """open_clip's ``encode_text`` on ``ids[:, :L]`` with everything positional cut to L."""

        def __init__(self, tower):
            super().__init__()
            self.tower = tower
            self.pooled = poolable_block(tower.transformer)  # the last block for the EOT token only

        def forward(self, ids):
            tower, length = self.tower, ids.shape[1]
            cast = tower.transformer.get_cast_dtype()
            x = tower.token_embedding(ids).to(cast) + tower.positional_embedding[:length].to(cast)
            mask = tower.attn_mask[:length, :length]
            if tower is model:  # CLIP keeps the text tower's settings under text_* names
                pool, eos = tower.text_pool_type, getattr(tower, "text_eos_id", None)
            else:  # open_clip's TextTransformer
                pool, eos = tower.pool_type, getattr(tower, "eos_id", None)
            if self.pooled:  # the pooled token's index as text_global_pool finds it
                rows = ids.argmax(dim=-1) if pool == "argmax" else (ids == eos).int().argmax(dim=-1)
                x = tower.ln_final(pooled_transformer(tower.transformer, x, rows, attn_mask=mask))
            else:
                x = text_global_pool(tower.ln_final(tower.transformer(x, attn_mask=mask)), ids, pool, eos_token_id=eos)
            projection = tower.text_projection
            if projection is not None:
                x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
            return F.normalize(x.float(), dim=-1)

    return CutText(text).eval()


def tower_parameter_bytes(model, tower: str) -> int:
    prefix = "visual." if tower_spec(tower) is VISION else None
    total = 0
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        in_vision = name.startswith("visual.")
        if (prefix and in_vision) or (not prefix and not in_vision):
            total += tensor.numel() * tensor.element_size()
    return total


def to_half(model) -> None:
    """fp16 weights with every normalisation computed in float32, as open_clip's own fp16 models do.

    open_clip's towers: linear/conv/attention weights and projections go to fp16
    (``convert_weights_to_lp``). A timm vision tower (EVA, PE-Core, MobileCLIP, SigLIP) and a custom
    text tower go to fp16 whole but for their norms: position tables, RoPE and pooling latents would
    otherwise meet fp16 activations in float32 (torch.export refuses the mix). Then every LayerNorm,
    GroupNorm and RMSNorm (open_clip's, torch's and timm's, 2d forms included) computes in float32
    with float32 affine weights and hands fp16 back (:func:`norms_in_fp32`). Softmax is handled on
    the graph (:func:`softmax_in_fp32`).
    """
    import torch  # noqa: PLC0415
    from open_clip.model import convert_weights_to_lp  # noqa: PLC0415

    text = getattr(model, "text", None)  # a custom text tower (CustomTextCLIP)
    if text is None and not is_timm_tower(model.visual):  # open_clip's CLIP: as its own fp16 models
        convert_weights_to_lp(model, torch.float16)
    else:  # open_clip's converter trips over a Linear text projection (SigLIP's proj_bias)
        for tower in (model.visual, text):
            if tower is not None:
                _half_except_norms(tower)
    norms_in_fp32(model)


def _half_except_norms(tower) -> None:
    """Every floating parameter and buffer of ``tower`` to fp16, except the normalisations' own, which
    stay exactly as trained (float32) for :func:`norms_in_fp32`."""
    norms = _norm_types()
    for module in tower.modules():
        if isinstance(module, norms):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.half()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.half()


def is_timm_tower(module) -> bool:
    """Whether an open_clip tower wraps a timm model (``TimmModel``: EVA, PE-Core, MobileCLIP, SigLIP)."""
    try:
        from open_clip.timm_model import TimmModel  # noqa: PLC0415
    except ImportError:  # pragma: no cover - open_clip without its timm adapter
        return False
    return isinstance(module, TimmModel)


def _norm_types() -> tuple[type, ...]:
    import torch  # noqa: PLC0415

    types: list[type] = [torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm]  # open_clip's and timm's
    try:  # LayerNorm/LayerNorm2d subclass torch's; timm's RMS and "simple" norms do not
        from timm import layers  # noqa: PLC0415

        types += [
            getattr(layers, n) for n in ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d") if hasattr(layers, n)
        ]
    except ImportError:  # pragma: no cover - timm is a dependency of open_clip
        pass
    return tuple(types)


def norms_in_fp32(model) -> int:
    """Make every normalisation module compute in float32 (input cast up, float32 affine weights, output
    cast back to the input's dtype), whatever its class; returns how many. Each module's class becomes
    a subclass that wraps the original ``forward``, so the exported graph shows Cast -> norm -> Cast."""
    import torch  # noqa: PLC0415

    norms = _norm_types()
    made: dict[type, type] = {}
    count = 0
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, norms) or getattr(cls, "_clip_triton_fp32", False):
            continue
        if cls not in made:

            def forward(self, x, _base=cls):
                return _base.forward(self, x.float()).to(x.dtype)

            made[cls] = type(f"{cls.__name__}Fp32", (cls,), {"forward": forward, "_clip_triton_fp32": True})
        module.to(torch.float32)
        module.__class__ = made[cls]
        count += 1
    return count


def fuse_for_inference(model) -> int:
    """Reparameterise a timm vision tower for inference (MobileCLIP's FastViT/MobileOne branches fuse
    into single convolutions, as Apple's and timm's inference recipes do); returns how many modules
    were fused. Same function, fewer ops: verification compares the fused graph with open_clip's
    unfused model. Other towers are left alone (0)."""
    visual = getattr(model, "visual", None)
    if not is_timm_tower(visual):
        return 0
    fusable = [m for m in visual.modules() if hasattr(m, "reparameterize") or hasattr(m, "fuse")]
    if fusable:
        from timm.utils.model import reparameterize_model  # noqa: PLC0415

        model.visual = reparameterize_model(visual, inplace=True)
    return len(fusable)


def example_input(contract: ModelContract, tower: str, batch: int = 2):
    import torch  # noqa: PLC0415

    spec, _ = contract.encoder_io(tower)
    if tower_spec(tower) is VISION:
        dtype = torch.float16 if spec.dtype == "float16" else torch.float32
        return torch.zeros((batch, *spec.shape), dtype=dtype)
    tok = contract.tokenizer
    ids = torch.full((batch, contract.context_length), tok.pad_token_id, dtype=torch.int32)
    start = [tok.sot_token_id] if tok.sot_token_id >= 0 else []  # Gemma and T5 add no start token
    ids[:, : len(start) + 1] = torch.tensor([*start, tok.eot_token_id], dtype=torch.int32)
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
    axes = {0: torch.export.Dim("batch", min=contract.batch.min, max=max(contract.batch.max, 2))}
    if tower_spec(tower) is not VISION and contract.tokenizer.dynamic:
        # One dynamic sequence axis from the shortest bucket's floor (2: start and end token) to the context.
        axes[1] = torch.export.Dim("sequence", min=2, max=contract.context_length)
    module = export_module(model, contract, tower)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example_input(contract, tower),),
            dynamo=True,
            input_names=[spec_in.name],
            output_names=[spec_out.name],
            dynamic_shapes=(axes,),  # by position: the graph's input is named by input_names
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
        "pooled_last_block": bool(getattr(module.inner, "pooled", False)),
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
        # -1 in the contract: a dynamic axis (dim_param, no value) in the graph.
        found = tuple(-1 if d.dim_param and not d.dim_value else d.dim_value for d in dims[1:])
        if found != spec.shape:
            raise ClipTritonError(f"{path}: {spec.name} shape {list(found)} != {list(spec.shape)}")


def export_openvino_ir(model, contract: ModelContract, tower: str, out_dir: Path) -> dict:
    """The tower converted straight from the module to OpenVINO IR (``openvino.convert_model``, its own
    PyTorch frontend), with the contract's tensor names and the same dynamic axes as the ONNX graph.

    OpenVINO's CPU plugin fuses this form better than the dynamo ONNX graph's attention (~120
    Transpose/Reshape nodes): docs/benchmarks.md. Weights stay float32 in the IR (no fp16
    compression): the CPU runtime chooses fp32 or bf16 compute when it compiles it.
    """
    import torch  # noqa: PLC0415

    try:
        import openvino as ov  # noqa: PLC0415
    except ImportError as exc:
        raise ClipTritonError(
            "--openvino-ir needs OpenVINO", "pip install 'clip-triton[cpu]' (or export without --openvino-ir)"
        ) from exc
    if contract.precision != "fp32":
        raise ClipTritonError(
            "--openvino-ir converts fp32 exports only (OpenVINO picks fp32 or bf16 compute itself)",
            "export with --precision fp32 for CPU serving, or drop --openvino-ir",
        )
    spec_in, spec_out = contract.encoder_io(tower)
    path = Path(out_dir) / tower_spec(tower).ir_file
    example = example_input(contract, tower)
    shape = (
        [-1, *spec_in.shape]
        if tower_spec(tower) is VISION
        else [-1, -1 if contract.tokenizer.dynamic else contract.context_length]
    )
    with torch.no_grad():
        converted = ov.convert_model(
            export_module(model, contract, tower), example_input=example, input=[ov.PartialShape(shape)]
        )
    converted.inputs[0].get_tensor().set_names({spec_in.name})
    converted.outputs[0].get_tensor().set_names({spec_out.name})
    ov.save_model(converted, os.fspath(path), compress_to_fp16=False)
    del converted
    gc.collect()
    weights = path.with_suffix(".bin")
    return {"file": path.name, "weights": weights.name, "bytes": path.stat().st_size + weights.stat().st_size}

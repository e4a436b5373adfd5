"""The int8 twin's first conv and the 2x2 max pool after it, computed on 2x2 blocks of pixels.

Why: after the unfold (kmnist_core/onnx_export.py), the first conv is a 1x1 conv with k*k = 9 inputs and
24 outputs a pixel, a GEMM shape ONNX Runtime's QLinearConv runs poorly (10.6 us a crop for 1.4 % of the
default twin's multiply-adds), followed by a transpose of its input and a max pool (2.2 us). Here it reads
each 2x2 block of pixels' (k+1) x (k+1) neighbourhood instead (16 inputs) and writes the four pixels'
outputs as four groups of channels (96 outputs: the same weights, placed at each pixel's offset in the
neighbourhood, zeros elsewhere), a quarter of the rows; the max pool becomes the element-wise max of the
four groups, in uint8. The integer sums, scales and roundings are the conv's, and max commutes with the
monotonic requantization, so the logits are the same bit for bit (tests/test_int8_twin.py), and the
twin runs 81.6 against 77.1 us a crop, Predictor.assess 1.09x (bench/pooled_conv.py).

`pool_first_conv` rewrites a quantized (QDQ) twin whose graph starts with that pattern, and names the
block size in the model's metadata (BLOCKS_KEY); kmnist_core/ort_model.py builds the blocks' input. Any
other model is returned as it is. Build time only (it imports onnx, a `[train]` dependency).
"""

from __future__ import annotations

import numpy as np

from kmnist_core.ort_model import BLOCKS_KEY, UNFOLD_KEY

BLOCK = 2  # the max pool's kernel and stride


def attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def pool_first_conv(onnx_int8: bytes) -> bytes:
    """The twin with its unfolded first conv and the 2x2 max pool after it computed on 2x2 blocks (see the
    module doc); any model without that pattern unchanged."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(onnx_int8)
    graph = model.graph
    meta = {p.key: p.value for p in model.metadata_props}
    k = int(meta.get(UNFOLD_KEY, 1))
    dims = graph.input[0].type.tensor_type.shape.dim
    size = dims[2].dim_value if len(dims) == 4 else 0
    if k == 1 or BLOCKS_KEY in meta or size % BLOCK or size != dims[3].dim_value:
        return onnx_int8

    def only(name: str, op: str):
        """The single node reading `name`, when it is an `op`; else None."""
        readers = [n for n in graph.node if name in n.input]
        return readers[0] if len(readers) == 1 and readers[0].op_type == op else None

    # input -> Q -> DQ -> Conv 1x1 -> Q0 -> [DQ -> MaxPool 2x2 -> Q] -> DQ ... (Q0 and Q share their scale)
    chain, name = [], graph.input[0].name
    for op in ("QuantizeLinear", "DequantizeLinear", "Conv", "QuantizeLinear", "DequantizeLinear", "MaxPool", "QuantizeLinear"):
        node = only(name, op)
        if node is None:
            return onnx_int8
        chain.append(node)
        name = node.output[0]
    conv, q0, dq_pool, pool, q_pool = chain[2:]
    pool_attrs = attributes(pool)
    if (pool_attrs.get("kernel_shape") != [BLOCK, BLOCK] or pool_attrs.get("strides") != [BLOCK, BLOCK]
            or any(pool_attrs.get("pads", [0])) or pool_attrs.get("ceil_mode", 0)
            or any(d != 1 for d in pool_attrs.get("dilations", [1])) or list(q_pool.input[1:]) != list(q0.input[1:])):
        return onnx_int8

    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    weight_dq, bias_dq = producers[conv.input[1]], producers[conv.input[2]]
    weights = numpy_helper.to_array(initializers[weight_dq.input[0]])
    channels = weights.shape[0]
    taps = weights.reshape(channels, k, k)
    side = k + BLOCK - 1
    blocked = np.zeros((BLOCK * BLOCK * channels, side, side), weights.dtype)
    for sy in range(BLOCK):
        for sx in range(BLOCK):
            group = sy * BLOCK + sx
            blocked[group * channels : (group + 1) * channels, sy : sy + k, sx : sx + k] = taps

    def replace(name: str, array: np.ndarray) -> None:
        initializers[name].CopyFrom(numpy_helper.from_array(array, name))

    replace(weight_dq.input[0], blocked.reshape(-1, side * side, 1, 1))
    # Per output channel: each group repeats the conv's scales, zero points and biases.
    for name in (*weight_dq.input[1:], *bias_dq.input):
        values = numpy_helper.to_array(initializers[name])
        if values.ndim == 1 and len(values) == channels:
            replace(name, np.tile(values, BLOCK * BLOCK))
    dims[1].dim_value, dims[2].dim_value, dims[3].dim_value = side * side, size // BLOCK, size // BLOCK

    # The pool: the max of the four groups of Q0's uint8 output, read by whatever read the pool's Q.
    pooled = q_pool.output[0] + "_blocks"
    nodes = []
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{pooled}_axis"))
    for g in range(BLOCK * BLOCK):
        for end, value in (("start", g * channels), ("end", (g + 1) * channels)):
            graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"{pooled}_{g}_{end}"))
        nodes.append(helper.make_node("Slice", [q0.output[0], f"{pooled}_{g}_start", f"{pooled}_{g}_end", f"{pooled}_axis"],
                                      [f"{pooled}_{g}"], name=f"{pooled}_{g}"))
    nodes.append(helper.make_node("Max", [f"{pooled}_{g}" for g in range(BLOCK * BLOCK)], [pooled], name=pooled))
    for node in graph.node:
        node.input[:] = [pooled if i == q_pool.output[0] else i for i in node.input]
    at = list(graph.node).index(dq_pool)
    for node in (dq_pool, pool, q_pool):
        graph.node.remove(node)
    for node in reversed(nodes):
        graph.node.insert(at, node)
    onnx.helper.set_model_props(model, {**meta, BLOCKS_KEY: str(BLOCK)})
    onnx.checker.check_model(model)
    return model.SerializeToString()

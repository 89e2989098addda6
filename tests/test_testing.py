"""The light-zoo fixture: seeded weights that make the real topologies behave like trained nets."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim_tool.testing import light_models, random_feed, run_proto, with_random_weights


def _outputs(proto: onnx.ModelProto, seeds: range) -> np.ndarray:
    return np.stack([run_proto(proto, random_feed(proto, seed=s))[0].ravel() for s in seeds])


def test_standardized_weights_make_the_output_depend_on_the_input():
    # Fan-in scaling alone: ShuffleNet's residual sums reach ~1e4 and every input gives the
    # same one-hot softmax, so any variant would "agree" with it 100%.
    plain = _outputs(with_random_weights(light_models()["shufflenet"], standardize=False), range(4))
    assert np.abs(plain - plain[0]).max() == 0.0
    fitted = _outputs(with_random_weights(light_models()["shufflenet"]), range(4))
    assert len(set(fitted.argmax(axis=1))) > 1
    assert fitted.max() < 0.9  # softmax not saturated


def test_batchnorm_statistics_are_those_of_its_input():
    proto = with_random_weights(light_models()["shufflenet"])
    first_bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.ValueInfoProto(name=first_bn.input[0]))
    seen = np.concatenate(
        [
            run_proto(probe, random_feed(proto, seed=s))[1]
            .transpose(1, 0, 2, 3)
            .reshape(len(weights[first_bn.input[3]]), -1)
            for s in (1, 2, 3, 4)
        ],
        axis=1,
    )
    np.testing.assert_allclose(weights[first_bn.input[3]], seen.mean(axis=1), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(weights[first_bn.input[4]], seen.var(axis=1), rtol=1e-3, atol=1e-4)


def test_same_seed_same_weights_and_callers_get_copies():
    a = with_random_weights(light_models()["squeezenet"], seed=3)
    a.graph.initializer[0].float_data.append(1.0)  # a caller editing its copy changes no other
    b = with_random_weights(light_models()["squeezenet"], seed=3)
    c = with_random_weights(light_models()["squeezenet"], seed=3)
    assert b.SerializeToString() == c.SerializeToString() != a.SerializeToString()

"""wa_tf.quantization.tfmot_adapter: each private TF-MOT / Keras attribute it reads, on real models.

A TF-MOT or tf_keras release that renames one of them fails here, by name.
"""
import pytest
import tf_keras

from wa_tf.layers import WinogradConv2D
from wa_tf.quantization import quantize_model, tfmot_adapter, unwrap
from wa_tf.quantization.quantizers import EMAQuantizer


def _model():
    inputs = tf_keras.Input((8, 8, 3))
    y = WinogradConv2D(4, tile_size=2, name="wa")(inputs)
    y = tf_keras.layers.GlobalAveragePooling2D(name="pool")(y)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="fc")(y))


def test_wrappers_and_their_quantizers():
    model = quantize_model(_model(), bits=8, quantize_first=True, layer_bits={"fc": 8})
    wrapped = {unwrap(layer).name: layer for layer in model.layers
               if tfmot_adapter.is_quantize_wrapper(layer)}
    assert set(wrapped) == {"wa_input_quant", "wa", "fc_input_quant", "fc"}
    assert not tfmot_adapter.is_quantize_wrapper(model.get_layer("pool"))
    # The flex layer's kernel and transforms, each with its quantizer and that one's state.
    weights = tfmot_adapter.weight_quantizers(wrapped["wa"])
    assert [v.name.split("/")[-1] for v, _, _ in weights] == ["kernel:0", "A_t:0", "B_t:0",
                                                              "G:0"]
    for _, quantizer, state in weights:
        assert isinstance(quantizer, EMAQuantizer)
        assert {"min_var", "max_var"} <= set(state)
    # An input layer has no weights, only its output's quantizer.
    assert tfmot_adapter.weight_quantizers(wrapped["wa_input_quant"]) == []
    quantizer, state = tfmot_adapter.output_quantizer(wrapped["wa_input_quant"])
    assert isinstance(quantizer, EMAQuantizer) and {"min_var", "max_var"} <= set(state)
    # A float model's layer is no wrapper.
    assert not any(tfmot_adapter.is_quantize_wrapper(layer) for layer in _model().layers)


def test_graph_networks_and_call_inputs():
    model = _model()
    assert tfmot_adapter.is_graph_network(model)

    class Subclassed(tf_keras.Model):
        def call(self, x):
            return x
    assert not tfmot_adapter.is_graph_network(Subclassed())
    layer = model.get_layer("fc")
    assert len(tfmot_adapter.inbound_nodes(layer)) == 1
    assert tfmot_adapter.call_inputs(model, layer) is model.get_layer("pool").output
    # A layer shared with another graph: its call in each model is found.
    inputs = tf_keras.Input((4,))
    other = tf_keras.Model(inputs, layer(inputs))
    assert len(tfmot_adapter.inbound_nodes(layer)) == 2
    assert tfmot_adapter.call_inputs(other, layer) is inputs
    assert tfmot_adapter.call_inputs(model, layer) is model.get_layer("pool").output
    with pytest.raises(ValueError, match="layer 'wa' is not called in model"):
        tfmot_adapter.call_inputs(other, model.get_layer("wa"))

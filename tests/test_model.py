import numpy as np

from cloudmask.training import model as model_lib


def test_reference_unet_has_the_published_size_and_layers():
    m = model_lib.build_unet()
    assert m.count_params() == model_lib.REFERENCE_PARAMETERS == 1_948_609
    assert len(m.layers) == 39  # 1 input + 15 conv + 14 ReLU + 3 pool + 3 upsample + 3 concat
    kinds = [type(layer).__name__ for layer in m.layers]
    assert kinds.count("Conv2D") == 15 and kinds.count("ReLU") == 14
    assert kinds.count("MaxPooling2D") == 3 and kinds.count("UpSampling2D") == 3
    assert "BatchNormalization" not in kinds and "Dropout" not in kinds
    assert m.input_shape == (None, 256, 256, 9) and m.output_shape == (None, 256, 256, 1)


def test_layer_details_follow_the_reference():
    m = model_lib.build_unet()
    convs = [layer for layer in m.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 32, 64, 64, 128, 128, 256, 256, 128, 128, 64, 64, 32, 32, 1]
    for c in convs[:-1]:
        assert c.kernel_size == (3, 3) and c.padding == "same" and c.use_bias
    # the 1x1 head too (reference model.py: Conv2D(1, 1, ..., kernel_initializer='he_normal'))
    assert all(type(c.kernel_initializer).__name__ == "HeNormal" for c in convs)
    assert convs[-1].kernel_size == (1, 1) and convs[-1].activation.__name__ == "sigmoid"
    ups = [layer for layer in m.layers if type(layer).__name__ == "UpSampling2D"]
    assert all(u.interpolation == "nearest" for u in ups)
    # concat order is [upsampled, skip]: the first input of every concat comes from an upsampling layer
    for layer in m.layers:
        if type(layer).__name__ == "Concatenate":
            first = layer._inbound_nodes[0].input_tensors[0]
            assert "up" in first._keras_history.operation.name


def test_forward_flops_at_default_width():
    assert abs(model_lib.forward_flops(model_lib.build_unet()) / 1e9 - 21.48) < 0.01


def test_configurable_size_predicts_probabilities():
    m = model_lib.build_unet(patch_size=64, filters=4, depth=2)
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 9)).astype(np.float32)
    y = np.asarray(m.predict(x, verbose=0))
    assert y.shape == (2, 64, 64, 1) and np.all((y >= 0) & (y <= 1))


def test_model_code_is_backend_neutral():
    import inspect

    source = inspect.getsource(model_lib)
    assert "tensorflow" not in source and "tf." not in source

"""The doors: each adapter against the real library it replaces (the loop ``Mixer``, timm's ``Mixup``, torchvision's
v2 ``CutMix``/``MixUp``, Lightning, Accelerate), on gloo ranks where the door mixes across them."""

"""The networks. Importing this package registers them, in this order (list_models() keeps it)."""
from gatetune.models.nets import digitnet, resnet20, mcifarnet  # noqa: F401
from gatetune.models.nets import squeezenet, mobilenet_v1, resnet18, vgg16_bn  # noqa: F401

"""ssl_vit: self-supervised pretraining for Vision Transformers on one timm backbone and one
Accelerate loop.

Import what you use from its modules (`ssl_vit.train.loop.fit`, `ssl_vit.weights.load_pretrained`,
`ssl_vit.methods.mae.MAE`, ...): the package itself imports nothing, so importing a method never
loads the training loop or Accelerate. docs/architecture.md draws the layers.
"""

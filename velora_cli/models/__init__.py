"""Models: references and loading (models.load) and the builders: QLoRA/LoRA (models.build) and full/pretrain
(models.full), as torchtune's model builders. The names and shapes velora knows are in config.presets."""

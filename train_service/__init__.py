"""bios train service: LoRA fine-tuning sessions over gRPC."""

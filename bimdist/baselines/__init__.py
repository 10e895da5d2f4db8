"""End-to-end MAE pipelines (DeepSpeed PipelineModule, torch.distributed.pipelining): the peers bimdist is
measured against. They reuse bimdist's own embedding, timm blocks and decoder, cut into pipeline layers."""

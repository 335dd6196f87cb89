"""The QLoRA pipeline's library: everything the stages, flows and `qlora` CLI share."""

"""The lens itself: the lens set, its losses and objective, read-outs and PEFT export."""

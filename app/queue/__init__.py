"""The queue: messages, their recipients and the operator actions on them."""

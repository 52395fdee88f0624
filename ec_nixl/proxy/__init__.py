"""The EPD proxy (`ec-nixl proxy`): names media, sends each request to an encoder, then to
a PD. It loads neither torch nor NIXL."""

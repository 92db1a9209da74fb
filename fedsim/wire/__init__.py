"""Arrays in Flower messages: the fast array codec and the one module that touches Flower's private
API. Low-level on purpose: engines and ``strategies`` both use it."""

"""C++ sources of codeshell.kernels (a package only so that packaging ships kernels.cpp; nothing to import)."""

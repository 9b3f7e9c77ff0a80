/* The ABI is header-only; this file gives the target something to compile. */
#include "accel_abi.h"

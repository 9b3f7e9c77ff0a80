#include "accel_sys.h"

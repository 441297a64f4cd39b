// The portable variant: plain C++ for any CPU (compiled without ISA flags).
#include "stages.h"

namespace wa_int8 {

const Variant& scalar_variant() {
  static const Variant variant{"scalar", InputTransformAny<PortableOps>, HadamardLoops,
                               OutputTransformAny<PortableOps>};
  return variant;
}

}  // namespace wa_int8

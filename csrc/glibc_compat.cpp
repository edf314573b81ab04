// libstdc++'s headers (GCC 11+) test glibc's __libc_single_threaded (GLIBC_2.32) to skip
// atomic reference counting in a process with one thread, which would pin the library to
// glibc >= 2.32. This library-local definition (hidden, never set) answers "not single
// threaded", so the counts stay atomic (always correct) and the library keeps to glibc 2.28
// (the manylinux_2_28 tag, tools/build_wheel.sh).
#include <sys/single_threaded.h>

char __libc_single_threaded = 0;

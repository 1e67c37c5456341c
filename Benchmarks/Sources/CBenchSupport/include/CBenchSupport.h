#ifndef CBENCHSUPPORT_H
#define CBENCHSUPPORT_H
#ifdef __cplusplus
extern "C" {
#endif
/// Pins the calling thread to one CPU (0-based). Returns 0 or an errno value.
int rfb_pin_thread(int cpu);
/// Number of CPUs this process may run on.
int rfb_cpu_count(void);
/// A spin-wait hint (x86 PAUSE).
void rfb_cpu_relax(void);
#ifdef __cplusplus
}
#endif
#endif

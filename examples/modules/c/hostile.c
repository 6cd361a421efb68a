/* hostile: one module, five ways to misbehave, chosen by the HOSTILE macro at build
 * time (build.sh builds each as hostile_<kind>.wasm). Each must be contained by the
 * node: its quota trips and it is restarted or throttled, its neighbours run on. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "mesh.h"

#define SPIN 1
#define MEMBOMB 2
#define RECURSION 3
#define LOGSPAM 4
#define FLOOD 5

__attribute__((used)) static volatile uint64_t sink;

#if HOSTILE == RECURSION
static uint64_t down(uint64_t n) {
    /* volatile keeps the compiler from turning this into a loop; `sink` is never that
     * large, so the recursion never ends. */
    volatile char frame[256];
    frame[n % sizeof frame] = (char)n;
    if (sink == UINT64_MAX) return n;
    return down(n + 1) + frame[0];
}
#endif

MESH_EXPORT("on_tick") void on_tick(void) {
#if HOSTILE == SPIN
    for (;;) sink++;
#elif HOSTILE == MEMBOMB
    for (;;) {
        char *p = malloc(1 << 20);
        if (p) memset(p, 1, 1 << 20);
    }
#elif HOSTILE == RECURSION
    sink = down(0);
#elif HOSTILE == LOGSPAM
    for (int i = 0; i < 1000; i++) mesh_log("spam spam spam spam", 19);
#elif HOSTILE == FLOOD
    static char payload[1024];
    for (int i = 0; i < 1000; i++) mesh_publish("flood", 5, payload, sizeof payload);
#else
#error "define HOSTILE"
#endif
}

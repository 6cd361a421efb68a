/* sensor: every tick, reads a temperature from a sensor file on the node's allowlist
 * (/run/mesh/sensors/temp, or the first path its init finds in kv key "path") and
 * publishes it on topic "temp". When the read is refused it publishes "?", so the
 * aggregator sees each tick either way; stdout (printf) becomes a log line. */
#include <stdio.h>
#include <string.h>
#include "mesh.h"

static char path[256] = "/run/mesh/sensors/temp";
static int ticks;

MESH_EXPORT("init") void init(void) {
    char stored[256];
    int32_t n = mesh_kv_get("path", 4, stored, sizeof stored - 1);
    if (n > 0 && n < (int32_t)sizeof stored) {
        memcpy(path, stored, (size_t)n);
        path[n] = 0;
    }
    printf("sensor reading %s\n", path);
}

MESH_EXPORT("on_tick") void on_tick(void) {
    char reading[64];
    int32_t n = mesh_sensor_read(path, (int32_t)strlen(path), reading, sizeof reading);
    if (n > (int32_t)sizeof reading) n = sizeof reading;
    if (n <= 0) {
        reading[0] = '?';
        n = 1;
    }
    /* A trailing newline (sysfs style) is not part of the reading. */
    while (n > 1 && (reading[n - 1] == '\n' || reading[n - 1] == ' ')) n--;
    int32_t r = mesh_publish("temp", 4, reading, n);
    if (r < 0 && ++ticks % 10 == 1) printf("publish refused: %d\n", (int)r);
}

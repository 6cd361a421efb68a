/* aggregator: subscribes to "temp", keeps the count, sum, min and max of the numeric
 * readings it receives, logs a summary every 8 readings and stores the count in its
 * persistent state. Its state is handed to its next version with snapshot/restore. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mesh.h"

struct stats {
    uint32_t count;
    uint32_t numeric;
    double sum, min, max;
};

static struct stats st;

MESH_EXPORT("init") void init(void) {
    mesh_subscribe("temp", 4);
    uint32_t count;
    if (mesh_kv_get("count", 5, &count, sizeof count) == (int32_t)sizeof count) st.count = count;
}

MESH_EXPORT("on_message") void on_message(int32_t topic_len, int32_t data_len) {
    char data[65];
    int32_t n = mesh_msg_data(data, sizeof data - 1);
    (void)topic_len;
    if (n < 0) return;
    if (n > data_len) n = data_len;
    if (n > (int32_t)sizeof data - 1) n = sizeof data - 1;
    data[n] = 0;
    st.count++;
    char *end;
    double v = strtod(data, &end);
    if (end != data) {
        if (st.numeric == 0 || v < st.min) st.min = v;
        if (st.numeric == 0 || v > st.max) st.max = v;
        st.sum += v;
        st.numeric++;
    }
    mesh_kv_set("count", 5, &st.count, sizeof st.count);
    if (st.count % 8 == 0) {
        if (st.numeric > 0)
            printf("readings %u mean %.2f min %.2f max %.2f\n", (unsigned)st.count,
                   st.sum / st.numeric, st.min, st.max);
        else
            printf("readings %u (none numeric)\n", (unsigned)st.count);
    }
}

MESH_EXPORT("snapshot") void snapshot(void) { mesh_snapshot_write(&st, sizeof st); }

MESH_EXPORT("restore") void restore(int32_t len) {
    if (len == (int32_t)sizeof st) mesh_msg_data(&st, sizeof st);
}

/* The mesh host API for C guests (see docs/host-api.md). Build with build.sh. */
#ifndef MESH_H
#define MESH_H

#include <stdint.h>

#define MESH_IMPORT(name) __attribute__((import_module("mesh"), import_name(name)))
#define MESH_EXPORT(name) __attribute__((export_name(name)))

/* Error codes: every host call that can be refused returns one of these (< 0). */
#define MESH_E_INVALID (-1)
#define MESH_E_DENIED (-2)
#define MESH_E_NOT_FOUND (-3)
#define MESH_E_TOO_LARGE (-4)
#define MESH_E_QUOTA (-5)
#define MESH_E_FULL (-6)
#define MESH_E_IO (-7)

MESH_IMPORT("log") void mesh_log(const char *ptr, int32_t len);
MESH_IMPORT("sensor_read")
int32_t mesh_sensor_read(const char *path, int32_t path_len, void *buf, int32_t buf_len);
MESH_IMPORT("publish")
int32_t mesh_publish(const char *topic, int32_t topic_len, const void *data, int32_t data_len);
MESH_IMPORT("subscribe") int32_t mesh_subscribe(const char *topic, int32_t topic_len);
MESH_IMPORT("kv_get")
int32_t mesh_kv_get(const void *key, int32_t key_len, void *buf, int32_t buf_len);
MESH_IMPORT("kv_set")
int32_t mesh_kv_set(const void *key, int32_t key_len, const void *val, int32_t val_len);
MESH_IMPORT("now_us") int64_t mesh_now_us(void);
MESH_IMPORT("random") int32_t mesh_random(void *buf, int32_t len);
MESH_IMPORT("msg_topic") int32_t mesh_msg_topic(char *buf, int32_t buf_len);
MESH_IMPORT("msg_data") int32_t mesh_msg_data(void *buf, int32_t buf_len);
MESH_IMPORT("snapshot_write") int32_t mesh_snapshot_write(const void *data, int32_t len);

#endif

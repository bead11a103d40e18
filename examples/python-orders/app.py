"""Each request places an order: a row in MySQL, a count in Valkey, an event through RabbitMQ,
then prints (and answers with) what it read back from all three. Everything it needs comes
from the variables miren injects: MYSQL_*, VALKEY_URL and RABBITMQ_URL."""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
import pymysql
import redis

QUEUE = "orders"


def mysql():
    return pymysql.connect(
        host=os.environ["MYSQL_HOST"],
        port=int(os.environ["MYSQL_PORT"]),
        user=os.environ["MYSQL_USER"],
        password=os.environ["MYSQL_PASSWORD"],
        database=os.environ["MYSQL_DATABASE"],
        autocommit=True,
    )


def place_order():
    with mysql() as db, db.cursor() as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS orders "
            "(id INT AUTO_INCREMENT PRIMARY KEY, placed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
        )
        cur.execute("INSERT INTO orders () VALUES ()")
        order_id = cur.lastrowid
        cur.execute("SELECT COUNT(*) FROM orders")
        (rows,) = cur.fetchone()

    cache = redis.Redis.from_url(os.environ["VALKEY_URL"])
    counted = cache.incr("orders:placed")

    amqp = pika.BlockingConnection(pika.URLParameters(os.environ["RABBITMQ_URL"]))
    try:
        channel = amqp.channel()
        channel.queue_declare(queue=QUEUE, durable=True)
        channel.basic_publish(
            exchange="",
            routing_key=QUEUE,
            body=json.dumps({"order": order_id}),
            properties=pika.BasicProperties(delivery_mode=2),  # persistent
        )
        # A consumer would live elsewhere; here the same request reads the event back.
        method, _, body = channel.basic_get(queue=QUEUE, auto_ack=True)
        event = json.loads(body) if method else None
    finally:
        amqp.close()

    return {"order": order_id, "mysql_rows": rows, "valkey_count": counted, "rabbitmq_event": event}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            result = place_order()
            status = 200
        except Exception as e:  # answer with the cause instead of a dropped connection
            result, status = {"error": f"{type(e).__name__}: {e}"}, 500
        print(json.dumps(result), flush=True)
        body = (json.dumps(result) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "3000"))
    print(f"orders listening on :{port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
